//! `vmm`: a small KVM virtual machine monitor built around a stage-2 guest
//! memory manager. See `docs/architecture.md` for the map of modules.
//!
//! - [`mm`]: the guest memory manager (no KVM inside).
//! - [`boot`]: guest image loading and boot tables (pure).
//! - [`kvm`]: the KVM memory manager and KVM helpers kvm-ioctls lacks.
//! - [`devices`]: the DMA engine and pinning of guest memory for it.
//! - [`vm`]: building a VM; [`vcpu`]: the vCPU thread loop;
//!   [`plan`]: what guests are told to do; [`failure`]: why a guest failed;
//!   [`run`]: `vmm run`; [`cli`]: flags;
//!   [`scenario`]: scripted memory changes against a running guest.
//! - [`mutants`]: deliberately planted bugs (cargo feature `mutants`) that
//!   prove the fuzzer finds them.
//! - [`units`]: sizes and durations as typed on the command line and in
//!   files, and as printed.
//! - [`bench`](mod@bench): `vmm bench faults`, guest page-fault latency.

pub mod bench;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod failure;
pub mod fuzz;
pub mod kvm;
pub mod mm;
pub mod mutants;
pub mod plan;
pub mod run;
pub mod scenario;
pub mod units;
pub mod vcpu;
pub mod vm;
