//! The guest memory manager. Nothing in `mm` calls KVM or names a KVM type:
//! it is a core that unit, property and model tests exercise without
//! `/dev/kvm`, and [`manager::MemoryManager`] runs on any
//! [`manager::MemslotBackend`] (real KVM in `vmm::kvm`, or the simulated
//! [`manager::SimKvm`]).
//!
//! - [`manager`]: the memory manager, the one writer of guest memory: slot-map
//!   ops applied to the backend's memslots with rollback, bracketed by
//!   invalidations and guard drains; dirty pages; consistency checks.
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`backing`]: host mappings (anon, shared, memfd, THP, hugetlb, file) that back guest memory.
//! - [`slot_map`]: guest memory slots managed like VMAs (split, merge, protect,
//!   move, resize), published for lock-free readers, with the memslot changes
//!   that keep KVM in sync.
//! - [`slot_lock`]: per-slot refcount locks (the `vm_refcnt` design): lockless
//!   readers, writers that exclude and drain.
//! - [`notifier`]: mmu-notifier-style invalidation ranges, KVM's sequence
//!   protocol for fault paths, and a translation cache built on it.
//! - [`guard`]: host-side guest memory access through per-slot guards (the
//!   slot map wired to the slot lock); writers exclude and drain first.
//! - [`pin_account`]: lock-free pinned-page and DMA-mapping budgets.
//! - [`stage2`]: a lockless software stage-2 table in x86 EPT format, with
//!   epoch-based reclamation of table pages.

pub mod addr;
pub mod backing;
pub mod guard;
pub mod manager;
#[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
pub(crate) mod model_support;
pub mod notifier;
pub mod pin_account;
pub mod slot_lock;
pub mod slot_map;
pub mod stage2;
pub(crate) mod sync;
