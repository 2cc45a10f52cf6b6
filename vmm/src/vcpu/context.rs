//! Everything a vCPU thread needs besides its fd: [`VcpuContext`].

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::console::ConsoleSender;
use crate::boot::memory::BootMemory;
use crate::devices::dma::DmaEngine;
use crate::mm::addr::Gpa;
use crate::mm::manager::MemoryManager;
use crate::plan::VcpuPlan;

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u64,
    /// Number of vCPUs of the VM (for resetting registers).
    pub vcpus: u64,
    /// The guest program's entry point (for resetting registers).
    pub entry: Gpa,
    /// The VMM's view of the boot region (for the mailbox).
    pub boot: BootMemory,
    /// The guest memory manager (for accesses that exit as MMIO).
    pub memory: Arc<MemoryManager>,
    /// The DMA engine the guest programs, if the VM has one.
    pub dma: Option<Arc<DmaEngine>>,
    /// Where commands come from.
    pub plan: Box<dyn VcpuPlan>,
    /// Console output.
    pub console: ConsoleSender,
    /// Set to stop the run.
    pub stop: Arc<AtomicBool>,
    /// Print per-command progress lines.
    pub progress: bool,
}

impl fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuContext")
            .field("index", &self.index)
            .finish()
    }
}
