//! The devices a run attaches to its VM: the pin manager, the IOMMU and,
//! when the guest may program it, the DMA engine; and their detaching, which
//! yields what they report.

use std::sync::Arc;

use super::error::{setup_err, RunError};
use super::report::DmaReport;
use crate::devices::dma::{DmaEngine, DmaStats};
use crate::devices::iommu::{Iommu, Stage2Report};
use crate::devices::pins::PinManager;
use crate::vm::Vm;

/// The devices of a running VM.
#[derive(Debug)]
pub(super) struct Devices {
    /// Pins guest memory for DMA and scenario `pin` steps.
    pub pins: Arc<PinManager>,
    /// The stage-2 table devices translate through.
    pub iommu: Arc<Iommu>,
    /// The DMA engine, if the guest may program one.
    pub dma: Option<Arc<DmaEngine>>,
}

/// What the devices report when detached.
#[derive(Debug)]
pub(super) struct DeviceReport {
    pub dma: DmaReport,
    pub stage2: Stage2Report,
}

impl Devices {
    /// Attaches the devices to `vm`; starts the DMA engine's thread only
    /// `with_dma`.
    pub(super) fn attach(vm: &Vm, with_dma: bool) -> Result<Self, RunError> {
        let pins = Arc::new(PinManager::new(vm.memory.clone(), vm.pins.clone()));
        let iommu = Arc::new(Iommu::new(vm.memory.clone()));
        let dma = if with_dma {
            let engine = DmaEngine::start(
                vm.memory.clone(),
                vm.boot.clone(),
                pins.clone(),
                iommu.clone(),
            )
            .map_err(setup_err("starting the DMA engine"))?;
            Some(Arc::new(engine))
        } else {
            None
        };
        Ok(Self { pins, iommu, dma })
    }

    /// Stops the DMA engine (it finishes queued requests and unpins), then
    /// detaches the IOMMU and the pin manager. Call once the vCPUs and the
    /// scenario driver have ended.
    pub(super) fn detach(self) -> Result<DeviceReport, RunError> {
        let dma = match self.dma {
            Some(engine) => {
                let engine = Arc::try_unwrap(engine).map_err(|_| RunError::Setup {
                    what: "stopping the DMA engine",
                    detail: "still referenced".into(),
                })?;
                let report = DmaReport::from(engine.stats());
                drop(engine);
                report
            }
            None => DmaReport::from(&DmaStats::default()),
        };
        // The table as the run left it; then the IOMMU unsubscribes.
        let stage2 = self.iommu.report();
        drop(self.iommu);
        drop(self.pins);
        Ok(DeviceReport { dma, stage2 })
    }
}
