//! KVM-facing helpers that kvm-ioctls does not provide.
//!
//! - [`memslots`]: the memory manager's backend on real KVM (memslot and
//!   dirty-log ioctls on a VM fd; [`memslots::KvmMemslots`] for the three
//!   dirty-log modes).
//! - [`dirty_ring`]: the per-vCPU dirty ring and its harvest protocol.
//! - [`stats`]: binary statistics through `KVM_GET_STATS_FD`.
//! - [`zap`]: what a memslot move or delete invalidates (KVM's zap-all
//!   quirk).

pub mod dirty_ring;
pub mod memslots;
pub mod stats;
pub mod zap;
