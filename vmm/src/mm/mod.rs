//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`stage2`]: a lock-free software stage-2 table in x86 EPT format.

pub mod addr;
pub mod stage2;
pub(crate) mod sync;
