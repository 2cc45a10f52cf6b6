//! The VMM's own view of the boot region (mailboxes, image) through
//! vm-memory: [`BootMemory`]. Below both the vCPU loop and the devices, which
//! read and write mailboxes through it; the VM builder creates it.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::mm::addr::Gpa;
use crate::mm::backing::HostMapping;

/// vm-memory refused to describe the boot region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vm-memory: {0}")]
pub struct BootMemoryError(String);

/// A vm-memory view of the boot region that owns the mapping it points into:
/// every clone keeps the memory mapped, so no clone can outlive it.
#[derive(Debug, Clone)]
pub struct BootMemory {
    // Declared before `_mapping`: the view is dropped first.
    memory: GuestMemoryMmap,
    _mapping: Arc<HostMapping>,
}

impl BootMemory {
    /// A view of `mapping` at guest-physical address 0.
    pub fn new(mapping: Arc<HostMapping>) -> Result<Self, BootMemoryError> {
        let memory = GuestMemoryMmap::from_regions(vec![guest_region(&mapping, Gpa(0))?])
            .map_err(|e| BootMemoryError(e.to_string()))?;
        Ok(Self {
            memory,
            _mapping: mapping,
        })
    }

    /// The vm-memory view (guest-physical addresses `[0, BOOT_SIZE)`).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

fn guest_region(mapping: &HostMapping, gpa: Gpa) -> Result<GuestRegionMmap, BootMemoryError> {
    // SAFETY: `mapping` is a live mapping of `len()` bytes with these flags;
    // the only caller, `BootMemory::new`, stores the region next to an `Arc`
    // of the mapping (dropped after it), so the region never outlives it.
    let region = unsafe {
        MmapRegion::build_raw(
            mapping.as_ptr(),
            mapping.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            mapping.mmap_flags(),
        )
    }
    .map_err(|e| BootMemoryError(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(gpa.0))
        .ok_or_else(|| BootMemoryError(format!("region at {gpa} overflows")))
}
