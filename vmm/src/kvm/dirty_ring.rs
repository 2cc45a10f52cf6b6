//! KVM's per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`): a safe
//! iterator over the `kvm_dirty_gfn` entries KVM publishes.
//!
//! # The protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING")
//! Each vCPU has a ring of `kvm_dirty_gfn { flags, slot, offset }` entries,
//! `ring_bytes / 16` of them, shared between KVM (the producer) and the VMM
//! (the harvester), mapped from the vCPU fd at page offset
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. Each entry cycles through three states:
//!
//! ```text
//!   0 (free) --KVM: write slot, offset; store-release flags = DIRTY-->
//!   DIRTY    --VMM: load-acquire flags, read slot/offset; store-release flags = RESET-->
//!   RESET    --KVM_RESET_DIRTY_RINGS: load-acquire flags, write-protect the page; flags = 0--> 0
//! ```
//!
//! - KVM writes an entry when the guest first writes a page whose
//!   write-protection the ring is tracking, then leaves the page writable:
//!   further writes push nothing until the entry is reset.
//! - The harvester keeps its own fetch index per ring. It loads `flags` with
//!   **acquire**: seeing `DIRTY` then guarantees it sees the `slot` and
//!   `offset` KVM wrote before its release store (a relaxed load could read
//!   a stale `offset`, the model in `loom_tests` shows it). It stops at the
//!   first entry that is not `DIRTY`. For each collected entry it stores
//!   `RESET` with **release**, so its reads of the entry happen before KVM
//!   may reuse it.
//! - `KVM_RESET_DIRTY_RINGS` (VM fd) then re-protects every page of a
//!   `RESET` entry and frees the entries. A write between the harvest and
//!   the reset is not logged again: the harvester must report the pages it
//!   collected after the reset returns (their contents are read after the
//!   report), which [`MemoryManager`](crate::mm::manager::MemoryManager) does.
//! - `slot` is `as_id << 16 | id`, `offset` is in pages from the slot's
//!   start: the entry names a slot *id*, so entries of a deleted slot must
//!   be harvested after the delete and before the id is reused.
//! - A ring reaching its soft limit (its size minus KVM's reserved entries)
//!   makes `KVM_RUN` return `KVM_EXIT_DIRTY_RING_FULL` until it is harvested
//!   and reset; the reserve holds the writes in flight, so none is lost.
//!
//! The ring must be enabled on the VM (`KVM_ENABLE_CAP`, size in bytes, a
//! power of two, at least a page) before any vCPU is created; while it is on
//! KVM refuses `KVM_GET_DIRTY_LOG`.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM published the entry.
pub const DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: the harvester collected the entry.
pub const DIRTY_GFN_F_RESET: u32 = 2;

/// The memory orderings of the harvester's side of the protocol.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HarvestOrder {
    /// Loading `flags` (acquire).
    pub(crate) load: Ordering,
    /// Storing `RESET` (release).
    pub(crate) reset: Ordering,
}

/// The orderings the protocol requires.
pub(crate) const HARVEST_ORDER: HarvestOrder = HarvestOrder {
    load: Ordering::Acquire,
    reset: Ordering::Release,
};

/// The `flags` word of one entry, as the harvester touches it (std's
/// atomic on the shared ring; loom's in the model).
pub(crate) trait EntryFlags {
    fn load_flags(&self, order: Ordering) -> u32;
    fn store_flags(&self, value: u32, order: Ordering);
}

impl EntryFlags for AtomicU32 {
    fn load_flags(&self, order: Ordering) -> u32 {
        self.load(order)
    }
    fn store_flags(&self, value: u32, order: Ordering) {
        self.store(value, order)
    }
}

/// The harvester's step on one entry: if KVM published it, reads it with
/// `read` and marks it collected. `None`: the entry is not `DIRTY` (the end
/// of what KVM published so far).
pub(crate) fn collect_entry<F: EntryFlags, T>(
    flags: &F,
    read: impl FnOnce() -> T,
    order: HarvestOrder,
) -> Option<T> {
    if flags.load_flags(order.load) & DIRTY_GFN_F_DIRTY == 0 {
        return None;
    }
    let entry = read();
    flags.store_flags(DIRTY_GFN_F_RESET, order.reset);
    Some(entry)
}

/// One collected entry: a page KVM logged dirty.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DirtyGfn {
    /// `as_id << 16 | slot id`, as KVM wrote it.
    pub slot: u32,
    /// Pages from the slot's start.
    pub offset: u64,
}

/// One vCPU's dirty ring, mapped from its fd (unmapped on drop; the mapping
/// keeps the vCPU file alive, so it may outlive the `VcpuFd`).
#[derive(Debug)]
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    /// The harvester's index of the next entry to look at (wraps).
    fetch: u32,
}

// SAFETY: the ring is plain shared memory; every access goes through
// `&mut self` (one harvester at a time) and the atomic protocol above.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (a vCPU fd of a VM with the ring enabled at
    /// `ring_bytes`).
    ///
    /// # Errors
    /// `ring_bytes` is not a positive multiple of 16 (`InvalidInput`), or
    /// `mmap` failed (e.g. the ring is not enabled on the VM).
    pub fn map(vcpu: &impl AsRawFd, ring_bytes: u32) -> io::Result<Self> {
        let size = std::mem::size_of::<kvm_dirty_gfn>() as u32;
        if ring_bytes == 0 || ring_bytes % size != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty ring size {ring_bytes} is not a positive multiple of {size}"),
            ));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: a fresh shared mapping of the vCPU fd at the ring's page
        // offset; no existing memory is affected. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            entries: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            count: ring_bytes / size,
            fetch: 0,
        })
    }

    /// Entries in the ring.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the ring has no entries (never, once mapped).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries KVM published since the last harvest, in order, each
    /// marked collected (`RESET`) as it is yielded. Follow with
    /// `KVM_RESET_DIRTY_RINGS` on the VM fd.
    pub fn harvest(&mut self) -> Harvest<'_> {
        Harvest { ring: self }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: `entries` is the start of our own mapping of `bytes`
        // bytes, used by nothing else once we are dropped.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), bytes) };
    }
}

/// Iterator over newly published entries; see [`DirtyRing::harvest`].
#[derive(Debug)]
pub struct Harvest<'a> {
    ring: &'a mut DirtyRing,
}

impl Iterator for Harvest<'_> {
    type Item = DirtyGfn;

    fn next(&mut self) -> Option<DirtyGfn> {
        let ring = &mut *self.ring;
        let index = (ring.fetch % ring.count) as usize;
        // SAFETY: `index < count`, so the entry lies inside the mapping.
        let entry = unsafe { ring.entries.as_ptr().add(index) };
        // SAFETY: `flags` is a naturally aligned u32 in shared memory that
        // KVM accesses only atomically (smp_store_release/smp_load_acquire);
        // the mapping lives as long as `ring`.
        let flags = unsafe { AtomicU32::from_ptr(&raw mut (*entry).flags) };
        let read = || {
            // SAFETY: the acquire load saw DIRTY, so KVM's writes of `slot`
            // and `offset` happened before; KVM does not touch a DIRTY entry
            // again until we store RESET and the VM's rings are reset.
            unsafe {
                DirtyGfn {
                    slot: std::ptr::read_volatile(&raw const (*entry).slot),
                    offset: std::ptr::read_volatile(&raw const (*entry).offset),
                }
            }
        };
        let gfn = collect_entry(flags, read, HARVEST_ORDER)?;
        ring.fetch = ring.fetch.wrapping_add(1);
        Some(gfn)
    }
}

#[cfg(all(test, vmm_loom))]
mod loom_tests;
