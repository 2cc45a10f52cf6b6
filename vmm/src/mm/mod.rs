//! The guest memory manager. Nothing in `mm` calls KVM: it is a pure core that
//! unit, property and model tests exercise without `/dev/kvm`.
//!
//! - [`addr`]: typed guest-physical and host-virtual addresses.
//! - [`notifier`]: invalidation ranges, KVM's fault-path sequence protocol and a translation cache.

pub mod addr;
pub mod notifier;
pub(crate) mod sync;
