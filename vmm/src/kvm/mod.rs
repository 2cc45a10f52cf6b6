//! KVM-facing helpers that kvm-ioctls does not provide.
//!
//! - [`stats`]: binary statistics through `KVM_GET_STATS_FD`.

pub mod stats;
