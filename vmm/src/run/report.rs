//! The machine-readable report of a run (`vmm run --json`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::config::RunConfig;
use crate::devices::iommu::Stage2Report;
use crate::mm::pin_account::PinStats;
use crate::scenario::ScenarioReport;
use crate::vcpu::VcpuReport;

/// Wall time of each phase, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Creating the VM, memory, memslots, vCPUs.
    pub setup_ms: f64,
    /// From starting vCPU threads until all ended.
    pub run_ms: f64,
    /// Dropping the VM and unmapping memory.
    pub teardown_ms: f64,
}

/// KVM binary statistics at the end of the run.
#[derive(Debug, Clone, Serialize)]
pub struct KvmStats {
    /// VM-wide counters (pages_4k, pages_2m, ...).
    pub vm: BTreeMap<String, u64>,
    /// vCPU counters summed over vCPUs (pf_fixed, pf_taken, exits, ...).
    pub vcpu: BTreeMap<String, u64>,
}

/// The report of one run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// "ok" or "failed".
    pub outcome: &'static str,
    /// The one-line reason of a failure.
    pub error: Option<String>,
    /// Guest program name or image path.
    pub guest: String,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Backing of guest RAM.
    pub backing: String,
    /// vCPU count.
    pub vcpu_count: u64,
    /// Dirty-log mode: bitmap, manual or ring.
    pub dirty_log: crate::mm::manager::DirtyLogMode,
    /// What memslot moves and deletes invalidated: `slot` or `all`, with
    /// the reason when `--memslot-zap slot` was not available.
    pub memslot_zap: String,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
    /// Phase timings.
    pub timings: Timings,
    /// Exits summed over vCPUs, by reason.
    pub exits: BTreeMap<&'static str, u64>,
    /// Per-vCPU results.
    pub vcpus: Vec<VcpuReport>,
    /// KVM statistics.
    pub kvm_stats: KvmStats,
    /// Pinned pages (now, peak, limit, charge failures) and DMA mappings.
    pub pins: PinStats,
    /// What the DMA engine did.
    pub dma: DmaReport,
    /// The IOMMU's stage-2 table at the end (runs mapped, counters).
    pub stage2: Stage2Report,
    /// Each scenario step's outcome, when a scenario ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<ScenarioReport>,
}

/// Inputs of [`RunReport::new`].
pub(super) struct Parts<'a> {
    pub config: &'a RunConfig,
    pub guest: String,
    pub scenario: Option<ScenarioReport>,
    pub error: Option<String>,
    pub reports: Vec<VcpuReport>,
    pub exits: BTreeMap<&'static str, u64>,
    pub stats: (BTreeMap<String, u64>, BTreeMap<String, u64>),
    pub tsc_khz: u32,
    pub zap_policy: crate::kvm::zap::ZapPolicy,
    pub pins: PinStats,
    pub dma: DmaReport,
    pub stage2: Stage2Report,
    pub setup: Duration,
    pub run: Duration,
    pub teardown: Duration,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl RunReport {
    pub(super) fn new(p: Parts<'_>) -> Self {
        Self {
            outcome: if p.error.is_none() { "ok" } else { "failed" },
            error: p.error,
            guest: p.guest,
            mem_bytes: p.config.mem_size,
            backing: p.config.backing.to_string(),
            vcpu_count: p.config.vcpus,
            dirty_log: p.config.dirty_log,
            memslot_zap: p.zap_policy.to_string(),
            tsc_khz: p.tsc_khz,
            timings: Timings {
                setup_ms: ms(p.setup),
                run_ms: ms(p.run),
                teardown_ms: ms(p.teardown),
            },
            exits: p.exits,
            vcpus: p.reports,
            kvm_stats: KvmStats {
                vm: p.stats.0,
                vcpu: p.stats.1,
            },
            scenario: p.scenario,
            pins: p.pins,
            dma: p.dma,
            stage2: p.stage2,
        }
    }

    /// Whether the guest succeeded.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// A one-line human summary.
    pub fn summary_line(&self) -> String {
        let commands: usize = self.vcpus.iter().map(|v| v.commands.len()).sum();
        if let (Some(s), None) = (&self.scenario, &self.error) {
            return format!(
                "{} OK: all {} steps met their expectations",
                self.guest,
                s.steps.len()
            );
        }
        match &self.error {
            None => format!(
                "guest {} OK: {} vCPU(s), {} MiB {} RAM, {} commands, {} exits, pf_fixed {}",
                self.guest,
                self.vcpu_count,
                self.mem_bytes >> 20,
                self.backing,
                commands,
                self.exits.values().sum::<u64>(),
                self.kvm_stats.vcpu.get("pf_fixed").copied().unwrap_or(0)
            ),
            Some(e) => format!("guest {} FAILED: {e}", self.guest),
        }
    }
}

/// The DMA engine's counters at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DmaReport {
    /// Requests submitted by guests.
    pub submitted: u64,
    /// Completed.
    pub done: u64,
    /// Failed on unplugged or read-only memory.
    pub faults: u64,
    /// Refused by the pin limit.
    pub no_pin: u64,
    /// Stopped by a memory change (pin revoked).
    pub revoked: u64,
    /// Invalid requests.
    pub invalid: u64,
    /// Bytes transferred.
    pub bytes: u64,
}

impl From<&crate::devices::dma::DmaStats> for DmaReport {
    fn from(s: &crate::devices::dma::DmaStats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        Self {
            submitted: s.submitted.load(Relaxed),
            done: s.done.load(Relaxed),
            faults: s.faults.load(Relaxed),
            no_pin: s.no_pin.load(Relaxed),
            revoked: s.revoked.load(Relaxed),
            invalid: s.invalid.load(Relaxed),
            bytes: s.bytes.load(Relaxed),
        }
    }
}
