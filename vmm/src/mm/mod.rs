//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.

pub mod addr;
pub(crate) mod sync;
