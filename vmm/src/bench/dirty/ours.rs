//! Ours: the project's path. The VM of `bench::guest` (the memory manager
//! over the real VM fd) built in the measured dirty-log mode
//! (`GuestBench::with_dirty_log`, which in ring mode attaches each vCPU's
//! ring as `vmm run` does), the area plugged through
//! `MemoryManager::apply`, dirty logging switched with
//! `apply(set_dirty_log)`, pages collected with `MemoryManager::dirty_pages_into`
//! into a vector kept across collects (raw keeps its list the same way).
//!
//! The manager has no separate clear: a report re-protects exactly what it
//! returns. Bitmap: `KVM_GET_DIRTY_LOG` clears as it reads. Manual: the
//! report reads the bitmap and issues `KVM_CLEAR_DIRTY_LOG` for the pages
//! it covers. Ring: the report harvests every ring and issues
//! `KVM_RESET_DIRTY_RINGS`. So ours' collect includes the clear in every
//! mode ([`OursVm::clears_in_collect`]) and its clear phase is empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{DirtyError, DirtyMode};
use super::{Area, AREA_BASE};
use crate::bench::guest::GuestBench;
use crate::bench::{Backing, FaultsConfig};
use crate::kvm::memslots::DEFAULT_RING_BYTES;
use crate::mm::addr::{Gfn, Gpa, HUGE_2M};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::manager::DirtyLogMode;
use crate::mm::slot_map::{PlugSpec, SlotFlags};
use crate::plan::Command;
use crate::vm::DirtyLogConfig;

/// Longest a guest phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes of one dirty-ring entry (`struct kvm_dirty_gfn`).
const RING_ENTRY_BYTES: u64 = 16;

/// The manager's VM with the area plugged.
pub struct OursVm {
    bench: GuestBench,
    area: Area,
    /// The report vector, kept across collects as raw keeps its list.
    pages: Vec<Gfn>,
}

/// The manager's mode for a bench mode.
fn log_mode(mode: DirtyMode) -> DirtyLogMode {
    match mode {
        DirtyMode::Bitmap => DirtyLogMode::Bitmap,
        DirtyMode::Manual => DirtyLogMode::Manual,
        DirtyMode::Ring => DirtyLogMode::Ring,
    }
}

impl OursVm {
    /// Builds the VM logging in `mode` (ring mode: `ring_entries` per
    /// vCPU, as the raw program uses) and plugs `area` (one slot per area
    /// slot).
    pub fn new(
        mode: DirtyMode,
        area: Area,
        vcpus: u64,
        ring_entries: u64,
    ) -> Result<Self, DirtyError> {
        let ring_bytes = match mode {
            DirtyMode::Ring => u32::try_from(ring_entries * RING_ENTRY_BYTES)
                .expect("ring_entries is at most KVM's limit, under 4 GiB of ring"),
            DirtyMode::Bitmap | DirtyMode::Manual => DEFAULT_RING_BYTES,
        };
        let dirty = DirtyLogConfig {
            mode: log_mode(mode),
            ring_bytes,
        };
        let mut cfg = FaultsConfig::small(HUGE_2M, Backing::ANON);
        cfg.vcpus = vcpus;
        let test_range = Arc::new(HostMapping::new(&BackingKind::Anon, HUGE_2M)?);
        let bench = GuestBench::with_dirty_log(&cfg, test_range, &[], dirty)?;
        let plugs: Vec<PlugSpec> = area
            .slots
            .iter()
            .map(|s| PlugSpec {
                gpa: Gpa(AREA_BASE + s.gpa_offset),
                size: s.len,
                mapping: area.mapping.clone(),
                offset: s.host_offset,
                flags: SlotFlags::NONE,
            })
            .collect();
        bench
            .memory()
            .apply(|m| m.plug_many(plugs))
            .map_err(|source| DirtyError::Memory {
                what: "plugging the area",
                source,
            })?;
        debug_assert_eq!(bench.memory().dirty_log_mode(), log_mode(mode));
        Ok(Self {
            bench,
            area,
            pages: Vec::new(),
        })
    }

    /// Runs `commands[i]` on vCPU `i`; returns the time until all finished.
    pub fn phase(&mut self, commands: Vec<Vec<Command>>) -> Result<Duration, DirtyError> {
        let t = Instant::now();
        self.bench.phase(commands, PHASE_TIMEOUT, |_| {})?;
        Ok(t.elapsed())
    }

    fn set_logging(&self, on: bool) -> Result<Duration, DirtyError> {
        let t = Instant::now();
        let len = self.area.len();
        self.bench
            .memory()
            .apply(|m| m.set_dirty_log(Gpa(AREA_BASE), len, on))
            .map_err(|source| DirtyError::Memory {
                what: "switching dirty logging",
                source,
            })?;
        Ok(t.elapsed())
    }

    /// Turns dirty logging on over the area.
    pub fn enable(&self) -> Result<Duration, DirtyError> {
        self.set_logging(true)
    }

    /// Turns it off.
    pub fn disable(&self) -> Result<Duration, DirtyError> {
        self.set_logging(false)
    }

    /// Collects the dirty GFNs into `out` (cleared first) with
    /// `MemoryManager::dirty_pages`, which also re-protects them.
    pub fn collect(&mut self, out: &mut Vec<u64>) -> Result<Duration, DirtyError> {
        out.clear();
        let t = Instant::now();
        self.bench
            .memory()
            .dirty_pages_into(Gpa(AREA_BASE), self.area.len(), &mut self.pages)
            .map_err(|source| DirtyError::Memory {
                what: "collecting dirty pages",
                source,
            })?;
        let took = t.elapsed();
        out.extend(self.pages.iter().map(|g| g.0));
        Ok(took)
    }

    /// Nothing to do: the collect re-protected what it returned.
    pub fn clear(&mut self) -> Result<Duration, DirtyError> {
        Ok(Duration::ZERO)
    }

    /// Whether the collect also re-protects (always, for the manager).
    pub fn clears_in_collect(&self) -> bool {
        true
    }

    /// Stops the vCPUs; the VM goes with it.
    pub fn finish(self) {
        self.bench.shutdown();
    }
}
