//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`backing`]: host mappings (anon, shared, memfd, THP, hugetlb, file) that back guest memory.
//! - [`pin_account`]: lock-free pinned-page and DMA-mapping budgets.
//! - [`slot_lock`]: per-slot refcount locks (the `vm_refcnt` design): lockless
//!   readers, writers that exclude and drain.

pub mod addr;
pub mod backing;
pub mod pin_account;
pub mod slot_lock;
pub(crate) mod sync;
