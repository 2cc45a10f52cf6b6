//! KVM-facing helpers that kvm-ioctls does not provide.
//!
//! - [`memslots`]: the memory manager's backend on real KVM (memslot and
//!   dirty-log ioctls on a VM fd).
//! - [`stats`]: binary statistics through `KVM_GET_STATS_FD`.

pub mod memslots;
pub mod stats;
