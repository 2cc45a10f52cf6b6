//! The devices test guests use besides the mailbox: a DMA engine that copies,
//! fills and checksums guest memory from a host thread, and the pin manager
//! it (and passthrough-style users) pin guest memory with, and the IOMMU
//! (a stage-2 table in EPT format) its accesses translate through.

pub mod dma;
pub mod iommu;
pub mod pins;
pub mod vfio;

#[cfg(all(test, vmm_shuttle))]
mod shuttle_tests;
