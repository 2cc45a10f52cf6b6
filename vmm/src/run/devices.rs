//! The devices a run attaches to its VM: the pin manager, the IOMMU and the
//! DMA engine, for guests that may use them; and their detaching, which
//! yields what they report.
//!
//! Built-in guests never program the DMA engine and never pin, so their VMs
//! get no devices at all: each one subscribes to the memory manager's
//! invalidation hub and the IOMMU builds a stage-2 table (with its epoch
//! collector), work that showed in the launch cost of a trivial guest. Their
//! report is what unused devices report: no DMA, an empty table.

use std::sync::Arc;

use super::error::{setup_err, RunError};
use super::report::DmaReport;
use crate::devices::dma::{DmaEngine, DmaStats};
use crate::devices::iommu::{Iommu, Stage2Report};
use crate::devices::pins::PinManager;
use crate::vm::Vm;

/// The devices of a running VM, if its guest may use any.
#[derive(Debug)]
pub(super) struct Devices(Option<Attached>);

/// The devices of a VM whose guest may use them.
#[derive(Debug)]
pub(super) struct Attached {
    /// Pins guest memory for DMA and scenario `pin` steps.
    pub pins: Arc<PinManager>,
    /// The stage-2 table devices translate through.
    pub iommu: Arc<Iommu>,
    /// The DMA engine.
    pub dma: Arc<DmaEngine>,
}

/// What the devices report when detached.
#[derive(Debug)]
pub(super) struct DeviceReport {
    pub dma: DmaReport,
    pub stage2: Stage2Report,
}

impl Devices {
    /// Attaches the devices to `vm` if `guest_may_use_them`, starting the
    /// DMA engine's thread; otherwise none.
    pub(super) fn attach(vm: &Vm, guest_may_use_them: bool) -> Result<Self, RunError> {
        if !guest_may_use_them {
            return Ok(Self(None));
        }
        let pins = Arc::new(PinManager::new(vm.memory.clone(), vm.pins.clone()));
        let iommu = Arc::new(Iommu::new(vm.memory.clone()));
        let engine = DmaEngine::start(
            vm.memory.clone(),
            vm.boot.clone(),
            pins.clone(),
            iommu.clone(),
        )
        .map_err(setup_err("starting the DMA engine"))?;
        Ok(Self(Some(Attached {
            pins,
            iommu,
            dma: Arc::new(engine),
        })))
    }

    /// The attached devices, if any.
    pub(super) fn attached(&self) -> Option<&Attached> {
        self.0.as_ref()
    }

    /// The DMA engine a vCPU's guest may program, if any.
    pub(super) fn dma(&self) -> Option<Arc<DmaEngine>> {
        self.0.as_ref().map(|a| a.dma.clone())
    }

    /// Stops the DMA engine (it finishes queued requests and unpins), then
    /// detaches the IOMMU and the pin manager. Call once the vCPUs and the
    /// scenario driver have ended.
    pub(super) fn detach(self) -> Result<DeviceReport, RunError> {
        let Some(attached) = self.0 else {
            return Ok(DeviceReport {
                dma: DmaReport::from(&DmaStats::default()),
                stage2: Stage2Report::default(),
            });
        };
        let engine = Arc::try_unwrap(attached.dma).map_err(|_| RunError::Setup {
            what: "stopping the DMA engine",
            detail: "still referenced".into(),
        })?;
        let dma = DmaReport::from(engine.stats());
        drop(engine);
        // The table as the run left it; then the IOMMU unsubscribes.
        let stage2 = attached.iommu.report();
        drop(attached.iommu);
        drop(attached.pins);
        Ok(DeviceReport { dma, stage2 })
    }
}
