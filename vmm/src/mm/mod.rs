//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`backing`]: host mappings (anon, shared, memfd, THP, hugetlb, file) that back guest memory.
//! - [`slot_map`]: guest memory slots managed like VMAs (split, merge, KVM memslot changes).

pub mod addr;
pub mod backing;
pub mod slot_map;
pub(crate) mod sync;
