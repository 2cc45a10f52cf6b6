//! The devices test guests use besides the mailbox: a DMA engine that copies,
//! fills and checksums guest memory from a host thread, and the pin manager
//! it (and passthrough-style users) pin guest memory with.

pub mod dma;
pub mod pins;
pub mod vfio;
