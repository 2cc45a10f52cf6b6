//! One test on one implementation: a bench VM (the CPL3 guest of
//! `bench::guest` on every vCPU), the test area cut into slots, and the
//! test's iterations, each timed.
//!
//! Per test, as KVM's `memslot_perf_test` (where it differs, see
//! `docs/bench-memslots.md`):
//! - map: the host discards the 32 MiB area, then the guest writes one word
//!   in every page, so each write maps a page in through the memslots;
//! - unmap / unmap-chunked: the guest writes a page in each half of the
//!   128 MiB area, then the host discards the area 4 KiB (2 MiB) at a time,
//!   one `madvise` per piece inside one slot;
//! - move-active / move-inactive: the guest writes 50 pages without pause
//!   (its pass repeats until the test ends) while the host moves the last
//!   slot past the area and back; active: half of the 50 pages lie in that
//!   slot, so the guest takes MMIO exits while it is away;
//! - rw: the guest writes every page of 512 MiB, then the host checks each
//!   page's first byte and writes a word in its second half.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{MemslotsError, RawMove, Test};
use super::layout::SlotLayout;
use super::target::{Ours, Raw, Target};
use crate::bench::guest::GuestBench;
use crate::bench::{Backing, BenchError, FaultsConfig};
use crate::kvm::zap::{MemslotZap, ZapPolicy};
use crate::mm::addr::{Gpa, GpaRange, HUGE_2M, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::plan::Command;

/// Guest-physical base of the test area: 8 GiB, above the bench's own
/// test range at 4 GiB.
pub const AREA_BASE: u64 = 8 << 30;
/// Pages the guest writes in the move tests (KVM's `MEM_TEST_MOVE_SIZE`).
pub const MOVE_PAGES: u64 = 50;
/// 2 MiB in pages: the chunk of unmap-chunked.
const CHUNK_PAGES: u64 = HUGE_2M / PAGE_SIZE;
/// Longest a guest phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, strum::Display)]
#[strum(serialize_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Impl {
    /// The memory manager.
    Ours,
    /// The raw ioctl loop.
    Raw,
}

/// One iteration's times.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// The whole iteration (guest and host parts).
    pub whole: Duration,
    /// Its host part.
    pub host: Duration,
}

/// A built VM with its area, ready to iterate.
pub struct Rig {
    bench: GuestBench,
    target: Box<dyn Target>,
    layout: SlotLayout,
    test: Test,
    /// Time to register the area's slots.
    pub populate: Duration,
}

/// The test area of `test` cut for a VM holding `slots` memslots in all, or
/// `None` when the area has fewer pages than slots (KVM skips that too), or
/// the move-active test's last slot is too small to hold half the pages the
/// guest writes.
pub fn layout_for(test: Test, slots: u64) -> Option<SlotLayout> {
    let area_slots = slots.checked_sub(super::config::BASE_SLOTS)?;
    let l = SlotLayout::new(AREA_BASE, test.area_pages(), area_slots)?;
    let last = l.slot(l.slots - 1).1;
    match test {
        Test::MoveActive if last < MOVE_PAGES / 2 || l.slots < 2 => None,
        Test::MoveInactive if (l.slots - 1) * l.pages_per_slot < MOVE_PAGES => None,
        _ => Some(l),
    }
}

/// vCPU `i`'s share of the area's pages: (first page, pages).
fn parts(layout: &SlotLayout, vcpus: u64) -> Vec<(u64, u64)> {
    let per = layout.pages / vcpus;
    (0..vcpus)
        .map(|i| {
            let first = i * per;
            let n = if i + 1 == vcpus {
                layout.pages - first
            } else {
                per
            };
            (first, n)
        })
        .collect()
}

fn range(gpa: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(gpa), len).expect("inside the guest window")
}

impl Rig {
    /// Builds the VM and the area for `imp` and registers its slots (raw
    /// moves slots as `raw_move` says).
    pub fn new(
        test: Test,
        layout: SlotLayout,
        vcpus: u64,
        imp: Impl,
        raw_move: RawMove,
        zap: MemslotZap,
    ) -> Result<Self, MemslotsError> {
        let mut cfg = FaultsConfig::small(HUGE_2M, Backing::ANON);
        cfg.vcpus = vcpus;
        cfg.memslot_zap = zap;
        let test_range = Arc::new(HostMapping::new(&BackingKind::Anon, HUGE_2M)?);
        let bench = GuestBench::new(&cfg, test_range, &[])?;
        let mut target: Box<dyn Target> = match imp {
            Impl::Ours => Box::new(Ours::new(bench.memory().clone(), layout)?),
            Impl::Raw => {
                let max = bench.memory().load().config().max_slots;
                let first = max - layout.slots as u32;
                if let Some(s) = bench.memory().registered().iter().find(|s| s.id.0 >= first) {
                    return Err(MemslotsError::Mismatch(format!(
                        "the bench VM's manager holds slot {} among the raw ids {first}..{max}",
                        s.id.0
                    )));
                }
                Box::new(Raw::new(bench.vm_fd().clone(), layout, max, raw_move)?)
            }
        };
        let populate = target.populate()?;
        Ok(Self {
            bench,
            target,
            layout,
            test,
            populate,
        })
    }

    /// What memslot moves and deletes invalidate in this rig's VM.
    pub fn zap_policy(&self) -> ZapPolicy {
        self.bench.zap_policy()
    }

    /// The 50 pages the guest writes in the move tests, and the last
    /// slot's start.
    fn move_area(&self) -> (u64, u64) {
        let last = self.layout.slot(self.layout.slots - 1).0;
        let before = match self.test {
            Test::MoveActive => MOVE_PAGES / 2,
            _ => MOVE_PAGES,
        };
        (last - before * PAGE_SIZE, last)
    }

    /// Where the last slot goes: past the area, 2 MiB-aligned.
    fn move_destination(&self) -> u64 {
        (self.layout.base + self.layout.len()).next_multiple_of(HUGE_2M)
    }

    fn guest(&mut self, commands: Vec<Vec<Command>>) -> Result<(), MemslotsError> {
        self.bench.phase(commands, PHASE_TIMEOUT, |_| {})?;
        Ok(())
    }

    fn touch_parts(&self) -> Vec<Vec<Command>> {
        parts(&self.layout, self.vcpus())
            .into_iter()
            .map(|(first, n)| {
                vec![Command::touch(
                    range(self.layout.base + first * PAGE_SIZE, n * PAGE_SIZE),
                    PAGE_SIZE,
                    true,
                )]
            })
            .collect()
    }

    fn vcpus(&self) -> u64 {
        self.bench.ram.results.len() as u64
    }

    /// Only vCPU 0 gets `cmd`.
    fn on_first(&self, cmd: Command) -> Vec<Vec<Command>> {
        let mut all = vec![Vec::new(); self.vcpus() as usize];
        all[0].push(cmd);
        all
    }

    /// One iteration of the test (the move tests' guest is already
    /// running); returns the time of its host part (the implementation's
    /// own work: discards, moves, host accesses).
    fn iteration(&mut self) -> Result<Duration, MemslotsError> {
        let l = self.layout;
        match self.test {
            Test::Map => {
                let t = Instant::now();
                self.target.discard(0, l.pages, u64::MAX)?;
                let took = t.elapsed();
                let cmds = self.touch_parts();
                self.guest(cmds)?;
                Ok(took)
            }
            Test::Unmap | Test::UnmapChunked => {
                let cmds = self.on_first(Command::touch(range(l.base, l.len()), l.len() / 2, true));
                self.guest(cmds)?;
                let chunk = if self.test == Test::Unmap {
                    1
                } else {
                    CHUNK_PAGES
                };
                let t = Instant::now();
                self.target.discard(0, l.pages, chunk)?;
                Ok(t.elapsed())
            }
            Test::MoveActive | Test::MoveInactive => {
                let last = l.slots - 1;
                let home = l.slot(last).0;
                let to = self.move_destination();
                let t = Instant::now();
                self.target.move_slot(last, to)?;
                self.target.move_slot(last, home)?;
                Ok(t.elapsed())
            }
            Test::Rw => {
                let cmds = self.touch_parts();
                self.guest(cmds)?;
                let parts = parts(&l, self.vcpus());
                let t = Instant::now();
                self.target.read_write(&parts)?;
                Ok(t.elapsed())
            }
        }
    }

    /// Runs iterations for `budget` (at least 2), after one untimed
    /// warm-up when `warm_up`; returns each iteration's times.
    pub fn run(&mut self, budget: Duration, warm_up: bool) -> Result<Vec<Timed>, MemslotsError> {
        let moving = matches!(self.test, Test::MoveActive | Test::MoveInactive);
        if moving {
            let (start, last) = self.move_area();
            if self.test == Test::MoveActive {
                self.bench
                    .expect_mmio(last, last + MOVE_PAGES / 2 * PAGE_SIZE);
            }
            let cmds = self.on_first(Command::touch(
                range(start, MOVE_PAGES * PAGE_SIZE),
                PAGE_SIZE,
                true,
            ));
            self.bench.start_phase(cmds, true)?;
        }
        let result = self.iterate(budget, warm_up);
        if moving {
            let finished = self.bench.finish_phase(PHASE_TIMEOUT, |_| {});
            self.bench.expect_mmio(0, 0);
            finished?;
        }
        result
    }

    fn iterate(&mut self, budget: Duration, warm_up: bool) -> Result<Vec<Timed>, MemslotsError> {
        if warm_up {
            self.iteration()?;
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 2 || start.elapsed() < budget {
            if let Some(signal) = crate::bench::interrupt::caught() {
                return Err(BenchError::Interrupted(signal).into());
            }
            let t = Instant::now();
            let host = self.iteration()?;
            times.push(Timed {
                whole: t.elapsed(),
                host,
            });
        }
        Ok(times)
    }

    /// Stops the vCPUs; the VM and its slots go with the rig.
    pub fn finish(self) {
        let Self { bench, target, .. } = self;
        bench.shutdown();
        drop(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layouts_follow_kvm_limits() {
        // 8,194 memslots: the map area still has a page per slot.
        assert_eq!(layout_for(Test::Map, 8194).unwrap().pages_per_slot, 1);
        // 32,764: KVM's map test skips; the others run.
        assert!(layout_for(Test::Map, 32_764).is_none());
        for t in [Test::Unmap, Test::MoveActive, Test::MoveInactive, Test::Rw] {
            assert!(layout_for(t, 32_764).is_some(), "{t}");
        }
        assert!(layout_for(Test::MoveActive, 32_764).unwrap().slot(32_760).1 >= MOVE_PAGES / 2);
    }

    #[test]
    fn test_parts_cover_the_area() {
        let l = layout_for(Test::Map, 509).unwrap();
        let p = parts(&l, 3);
        assert_eq!(p.iter().map(|x| x.1).sum::<u64>(), l.pages);
        assert_eq!(p[1].0, p[0].1);
    }
}
