//! The real tier: a timeline becomes a scenario (the model's predictions as
//! its expectations) run in-process by `vmm run`'s machinery on a real KVM
//! VM with vCPUs; the scenario driver checks every step's outcome, and after
//! every memory op KVM's memslots against the map, the map against the
//! mirror, the hub and the IOMMU's leaves, and KVM itself by sampled probes
//! ([`crate::scenario::invariants`]); the campaign checks for leaks after
//! each VM ([`super::leaks`]).

use std::sync::Arc;
use std::time::Duration;

use guest_image::protocol::{layout, MMIO_BASE, MMIO_SIZE};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};

use crate::mm::backing::BackingKind;
use crate::mm::pin_account::PinLimit;
use crate::plan::BuiltinGuest;
use crate::run::{self, GuestSource, RunConfig, Verbosity};
use crate::scenario::num::Num;
use crate::scenario::{Scenario, Step};

use super::finding::Finding;
use super::model::slots::Limits;
use super::model::Layout;

/// Why the real tier cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    /// `/dev/kvm` or a capability query failed.
    #[error("KVM: {0}")]
    Kvm(String),
    /// The VM could not be set up.
    #[error("the run could not start: {0}")]
    Run(String),
}

/// The layout of the VM `vmm run` builds with `mem` bytes of RAM and
/// `vcpus` vCPUs, read from KVM (guest-physical width, slot budget,
/// read-only slot support).
pub fn layout(mem: u64, vcpus: u64, pin_limit: u64) -> Result<Layout, RealError> {
    layout_with(
        mem,
        vcpus,
        pin_limit,
        crate::mm::manager::DirtyLogMode::Bitmap,
    )
}

/// As [`layout()`], for a VM logging dirty pages in `dirty_log` mode.
pub fn layout_with(
    mem: u64,
    vcpus: u64,
    pin_limit: u64,
    dirty_log: crate::mm::manager::DirtyLogMode,
) -> Result<Layout, RealError> {
    let kvm = Kvm::new().map_err(|e| RealError::Kvm(format!("opening /dev/kvm: {e}")))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| RealError::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let bits = crate::vm::phys_bits(&cpuid);
    let window = 1u64 << bits.min(40);
    Ok(Layout {
        boot_end: layout::BOOT_SIZE,
        ram: (layout::RAM_BASE, mem),
        limits: Limits {
            max_gpa: 1u64 << bits,
            max_slots: kvm.get_nr_memslots(),
            reserved: (MMIO_BASE, MMIO_BASE + MMIO_SIZE),
            read_only: kvm.check_extension(Cap::ReadonlyMem),
        },
        pin_limit,
        vcpus,
        guest_end: window.min(layout::IDENTITY_END) & !((1 << 30) - 1),
        dirty_log,
    })
}

/// The scenario of `steps` for `layout`, as a reproducer file holds it.
pub fn scenario(name: &str, description: &str, layout: &Layout, steps: Vec<Step>) -> Scenario {
    Scenario {
        name: Some(name.to_string()),
        description: Some(description.to_string()),
        mem: Some(Num(layout.ram.1)),
        vcpus: Some(layout.vcpus),
        backing: None,
        timeout: None,
        dirty_log: (layout.dirty_log != crate::mm::manager::DirtyLogMode::Bitmap)
            .then(|| layout.dirty_log.to_string()),
        pin_limit: Some(format!("{}p", layout.pin_limit)),
        full_check_every: None,
        probe_kvm_every: None,
        steps,
    }
}

/// Runs `scenario` on a real VM; the first step that missed its expectation
/// (or the run's error).
pub fn run(
    scenario: Scenario,
    layout: &Layout,
    timeout: Duration,
) -> Result<Option<Finding>, RealError> {
    run_with_report(scenario, layout, timeout).map(|r| r.0)
}

/// Each step that ran: its kind and what happened.
pub type StepsRan = Vec<(String, String)>;

/// As [`run()`], with each step that ran.
pub fn run_with_report(
    scenario: Scenario,
    layout: &Layout,
    timeout: Duration,
) -> Result<(Option<Finding>, StepsRan), RealError> {
    let steps = scenario.steps.clone();
    let config = RunConfig {
        mem_size: layout.ram.1,
        vcpus: layout.vcpus,
        backing: BackingKind::Anon,
        guest: GuestSource::Builtin(BuiltinGuest::Default),
        timeout,
        seed: 0,
        verbosity: Verbosity::Quiet,
        scenario: Some(Arc::new(scenario)),
        pin_limit: Some(PinLimit::Pages(layout.pin_limit)),
        dirty_log: layout.dirty_log,
        dirty_ring_bytes: crate::kvm::memslots::DEFAULT_RING_BYTES,
        // The oracle reads the scenario's outcomes, not KVM's counters.
        kvm_stats: false,
        memslot_zap: crate::kvm::zap::MemslotZap::default(),
    };
    let report =
        run::run(&config, Box::new(std::io::sink())).map_err(|e| RealError::Run(e.to_string()))?;
    let ran: Vec<(String, String)> = report
        .scenario
        .as_ref()
        .map(|s| {
            s.steps
                .iter()
                .map(|s| (s.kind.clone(), s.actual.clone()))
                .collect()
        })
        .unwrap_or_default();
    let Some(error) = report.error else {
        return Ok((None, ran));
    };
    let failed = report
        .scenario
        .as_ref()
        .and_then(|s| s.steps.iter().find(|s| !s.passed));
    let finding = match failed {
        Some(s) => {
            let outcome = s.actual.split(':').next().unwrap_or("").trim().to_string();
            Finding {
                step: s.step,
                kind: s.kind.clone(),
                what: s.what.clone(),
                expected: s.expect.clone(),
                actual: s.actual.clone(),
                signature: format!("{}:{outcome}", s.kind),
            }
        }
        None => {
            let at = report.scenario.as_ref().map_or(0, |s| s.steps.len());
            Finding {
                step: at,
                kind: steps
                    .get(at.saturating_sub(1))
                    .map_or("run", |s| s.kind())
                    .to_string(),
                what: "the run".into(),
                expected: "a clean run".into(),
                actual: error.clone(),
                signature: format!("run:{}", error.split(':').next().unwrap_or("")),
            }
        }
    };
    Ok((Some(finding), ran))
}
