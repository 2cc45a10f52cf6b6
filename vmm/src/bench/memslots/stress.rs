//! The modification-stress mode, after KVM's
//! `memslot_modification_stress_test`: vCPUs write their part of an area
//! again and again while the host adds and deletes a one-page slot in a loop
//! beside it; the guest's pass rate with the loop is compared with its rate
//! without it, in the same VM. Ours adds and deletes through
//! `MemoryManager::apply` (plug, unplug); raw issues the two ioctls.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::config::{MemslotsError, RawMove};
use super::layout::SlotLayout;
use super::target::{raw_add_delete, Ours, Raw, Target};
use super::workload::{Impl, AREA_BASE};
use crate::bench::guest::GuestBench;
use crate::bench::{Backing, FaultsConfig};
use crate::kvm::zap::MemslotZap;
use crate::mm::addr::{Gpa, GpaRange, HUGE_2M, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::slot_map::SlotFlags;
use crate::plan::Command;

/// Where the added and deleted slot goes: below the area, away from
/// everything the guest touches.
pub const CHURN_GPA: u64 = 6 << 30;

/// One implementation's stress figures.
#[derive(Debug, Clone, Serialize)]
pub struct StressResult {
    /// Which implementation.
    pub implementation: Impl,
    /// Guest passes over its memory per second without the loop.
    pub quiet_passes_per_s: f64,
    /// Guest passes per second while the host adds and deletes a slot.
    pub churn_passes_per_s: f64,
    /// `quiet / churn`: how much the loop slows the vCPUs (1.0 = not at all).
    pub slowdown: f64,
    /// Add+delete pairs per second the host made meanwhile.
    pub pairs_per_s: f64,
}

/// Runs the stress mode on `imp`: `size` bytes per vCPU, `time` per phase.
pub fn run(
    imp: Impl,
    vcpus: u64,
    size: u64,
    time: Duration,
    zap: MemslotZap,
) -> Result<StressResult, MemslotsError> {
    let mut cfg = FaultsConfig::small(HUGE_2M, Backing::ANON);
    cfg.vcpus = vcpus;
    cfg.memslot_zap = zap;
    let test_range = Arc::new(HostMapping::new(&BackingKind::Anon, HUGE_2M)?);
    let mut bench = GuestBench::new(&cfg, test_range, &[])?;
    let pages = size / PAGE_SIZE * vcpus;
    let layout = SlotLayout::new(AREA_BASE, pages, 1).expect("one slot of at least a page");
    let max = bench.memory().load().config().max_slots;
    let mut area: Box<dyn Target> = match imp {
        Impl::Ours => Box::new(Ours::new(bench.memory().clone(), layout)?),
        Impl::Raw => Box::new(Raw::new(
            bench.vm_fd().clone(),
            layout,
            max,
            RawMove::KvmMove,
        )?),
    };
    area.populate()?;
    let commands: Vec<Vec<Command>> = (0..vcpus)
        .map(|i| {
            let r = GpaRange::new(Gpa(AREA_BASE + i * size), size).expect("inside the window");
            vec![Command::touch(r, PAGE_SIZE, true)]
        })
        .collect();
    // Fault everything in first: both phases then measure steady writes.
    bench.phase(commands.clone(), Duration::from_secs(300), |_| {})?;
    let page = Arc::new(HostMapping::new(&BackingKind::Anon, PAGE_SIZE)?);
    let memory = bench.memory().clone();
    let fd = bench.vm_fd().clone();
    let churn = |bench: &mut GuestBench| -> Result<(f64, u64), MemslotsError> {
        let before = bench.progress.load(Ordering::Relaxed);
        bench.start_phase(commands.clone(), true)?;
        let t = Instant::now();
        let mut pairs = 0;
        while t.elapsed() < time {
            match imp {
                Impl::Ours => {
                    let p = page.clone();
                    memory
                        .apply(|m| m.plug(Gpa(CHURN_GPA), PAGE_SIZE, p, 0, SlotFlags::NONE))
                        .and_then(|_| memory.apply(|m| m.unplug(Gpa(CHURN_GPA), PAGE_SIZE)))
                        .map_err(|source| MemslotsError::Memory {
                            what: "adding and deleting the stress slot".into(),
                            source,
                        })?;
                }
                Impl::Raw => {
                    if let Err(e) = raw_add_delete(&fd, max - 2, CHURN_GPA, page.hva().0) {
                        // The slot may still be registered: keep its page mapped.
                        std::mem::forget(page.clone());
                        return Err(e);
                    }
                }
            }
            pairs += 1;
        }
        bench.finish_phase(Duration::from_secs(300), |_| {})?;
        let elapsed = t.elapsed().as_secs_f64();
        let passes = bench.progress.load(Ordering::Relaxed) - before;
        Ok((passes as f64 / elapsed, (pairs as f64 / elapsed) as u64))
    };
    let quiet = {
        let before = bench.progress.load(Ordering::Relaxed);
        bench.start_phase(commands.clone(), true)?;
        let t = Instant::now();
        std::thread::sleep(time);
        bench.finish_phase(Duration::from_secs(300), |_| {})?;
        (bench.progress.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64()
    };
    let (loaded, pairs) = churn(&mut bench)?;
    bench.shutdown();
    drop(area);
    Ok(StressResult {
        implementation: imp,
        quiet_passes_per_s: quiet,
        churn_passes_per_s: loaded,
        slowdown: quiet / loaded.max(f64::MIN_POSITIVE),
        pairs_per_s: pairs as f64,
    })
}
