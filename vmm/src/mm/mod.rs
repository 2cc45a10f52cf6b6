//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`slot_lock`]: per-slot refcount lock (lockless readers, draining writers).

pub mod addr;
pub mod slot_lock;
pub(crate) mod sync;
