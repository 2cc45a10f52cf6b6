//! KVM-facing helpers that kvm-ioctls does not provide.
//!
//! - [`memslots`]: the one caller of `KVM_SET_USER_MEMORY_REGION`: applies
//!   slot-map transitions to KVM with rollback, and reads dirty logs.
//! - [`stats`]: binary statistics through `KVM_GET_STATS_FD`.

pub mod memslots;
pub mod stats;
