//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`backing`]: host mappings (anon, shared, memfd, THP, hugetlb, file) that back guest memory.
//! - [`pin_account`]: lock-free pinned-page and DMA-mapping budgets.

pub mod addr;
pub mod backing;
pub mod pin_account;
pub(crate) mod sync;
