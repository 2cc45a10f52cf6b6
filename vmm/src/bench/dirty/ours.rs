//! Ours: the project's path. The VM of `bench::guest` (the memory manager
//! over the real VM fd), the area plugged through `MemoryManager::apply`,
//! dirty logging switched with `apply(set_dirty_log)`, pages collected with
//! `MemoryManager::dirty_pages`.
//!
//! Each dirty-log mode is one match arm per phase. The manager implements
//! the bitmap mode; the manual and ring arms refuse with
//! [`DirtyError::NotWired`] until the manager offers those modes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{DirtyError, DirtyMode};
use super::{Area, AREA_BASE};
use crate::bench::guest::GuestBench;
use crate::bench::{Backing, FaultsConfig};
use crate::mm::addr::{Gpa, HUGE_2M};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::slot_map::{PlugSpec, SlotFlags};
use crate::plan::Command;

/// Longest a guest phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// The manager's VM with the area plugged.
pub struct OursVm {
    mode: DirtyMode,
    bench: GuestBench,
    area: Area,
}

impl OursVm {
    /// Builds the VM and plugs `area` (one slot per area slot).
    ///
    /// # Errors
    /// [`DirtyError::NotWired`] at once for a mode the manager lacks.
    pub fn new(mode: DirtyMode, area: Area, vcpus: u64) -> Result<Self, DirtyError> {
        match mode {
            DirtyMode::Bitmap => {}
            DirtyMode::Manual | DirtyMode::Ring => return Err(DirtyError::NotWired(mode)),
        }
        let mut cfg = FaultsConfig::small(HUGE_2M, Backing::ANON);
        cfg.vcpus = vcpus;
        let test_range = Arc::new(HostMapping::new(&BackingKind::Anon, HUGE_2M)?);
        let bench = GuestBench::new(&cfg, test_range, &[])?;
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
        Ok(Self { mode, bench, area })
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
        match self.mode {
            DirtyMode::Bitmap => self
                .bench
                .memory()
                .apply(|m| m.set_dirty_log(Gpa(AREA_BASE), len, on))
                .map_err(|source| DirtyError::Memory {
                    what: "switching dirty logging",
                    source,
                })?,
            DirtyMode::Manual | DirtyMode::Ring => return Err(DirtyError::NotWired(self.mode)),
        };
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

    /// Collects the dirty GFNs into `out` (cleared first).
    pub fn collect(&mut self, out: &mut Vec<u64>) -> Result<Duration, DirtyError> {
        out.clear();
        let t = Instant::now();
        match self.mode {
            DirtyMode::Bitmap => {
                let pages = self
                    .bench
                    .memory()
                    .dirty_pages(Gpa(AREA_BASE), self.area.len())
                    .map_err(|source| DirtyError::Memory {
                        what: "collecting dirty pages",
                        source,
                    })?;
                out.extend(pages.into_iter().map(|g| g.0));
            }
            DirtyMode::Manual | DirtyMode::Ring => return Err(DirtyError::NotWired(self.mode)),
        }
        Ok(t.elapsed())
    }

    /// Re-protects what the last collect returned (bitmap: `dirty_pages`
    /// already did, as `KVM_GET_DIRTY_LOG` does).
    pub fn clear(&mut self) -> Result<Duration, DirtyError> {
        match self.mode {
            DirtyMode::Bitmap => Ok(Duration::ZERO),
            DirtyMode::Manual | DirtyMode::Ring => Err(DirtyError::NotWired(self.mode)),
        }
    }

    /// Stops the vCPUs; the VM goes with it.
    pub fn finish(self) {
        self.bench.shutdown();
    }
}
