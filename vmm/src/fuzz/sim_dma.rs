//! DMA steps on the simulated tier: a `dma-fill`, `dma-copy` or
//! `dma-checksum` runs the DMA engine's transfer on the timeline's thread
//! ([`run_transfer`]): the same pins, guarded chunks and IOMMU translations
//! as the engine's thread on a real VM, so device writes set the IOMMU's
//! dirty bits that every `dirty-pages` merges into its report.

use std::sync::Arc;

use guest_image::protocol::{dma_op, DmaDescriptor};

use crate::devices::dma::{run_transfer, DmaError};
use crate::devices::iommu::Iommu;
use crate::devices::pins::PinManager;
use crate::mm::manager::MemoryManager;
use crate::scenario::step::{Action, Guest};
use crate::scenario::Outcome;

/// The outcome of DMA step `action` (`None` if it is not one), as the
/// scenario's guest side names a transfer's status.
pub fn step(
    memory: &Arc<MemoryManager>,
    pins: &Arc<PinManager>,
    iommu: &Arc<Iommu>,
    action: &Action,
) -> Option<(Outcome, String)> {
    let desc = |op, src, dst, len, value| DmaDescriptor {
        op,
        src,
        dst,
        len,
        value,
        ..DmaDescriptor::default()
    };
    let (d, want) = match action {
        Action::DmaFill(Guest { command: c, .. }) => {
            (desc(dma_op::FILL, 0, c.gpa.0, c.size.0, c.value.0), None)
        }
        Action::DmaCopy(Guest { command: c, .. }) => {
            (desc(dma_op::COPY, c.gpa.0, c.to.0, c.size.0, 0), None)
        }
        Action::DmaChecksum(Guest { command: c, .. }) => (
            desc(dma_op::CHECKSUM, c.gpa.0, 0, c.size.0, 0),
            c.value.map(|v| v.0),
        ),
        _ => return None,
    };
    Some(match run_transfer(memory, pins, iommu, &d) {
        Ok(sum) => match want {
            Some(v) if v != sum => (
                Outcome::Mismatch,
                format!("checksum {sum:#x}, expected {v:#x}"),
            ),
            _ => (Outcome::Ok, format!("DMA done (checksum {sum:#x})")),
        },
        Err(e) => (
            match e {
                DmaError::Invalid => Outcome::DmaInvalid,
                DmaError::Fault => Outcome::DmaFault,
                DmaError::NoPin => Outcome::DmaNoPin,
                DmaError::Revoked => Outcome::DmaRevoked,
            },
            format!("DMA: {e}"),
        ),
    })
}
