//! `vmm`: a small KVM virtual machine monitor built around a stage-2 guest
//! memory manager. See `docs/architecture.md` for the map of modules.

pub mod mm;
