//! `vmm bench dirty`: KVM's `dirty_log_perf_test`, measured on the
//! project's memory manager beside a raw program doing the same ioctls and
//! guest writes, in the same run.
//!
//! Per mode ([`DirtyMode`]: bitmap, manual with initially-set, ring): the
//! vCPUs (the CPL3 bench guest) write all their memory (populate), dirty
//! logging is enabled, then each iteration the vCPUs write every
//! round(100/W)-th page of their part, the dirty pages are collected and
//! cleared; each phase is timed, the collected pages are checked to cover
//! what the guest wrote, and logging is disabled at the end. The report
//! gives each iteration, the medians, ours/raw per phase against the goal
//! (at most 1.1), ring against bitmap collect, and (`--enable-scan`) the
//! enable time over memory sizes, where manual's initially-set should stay
//! flat. `--plot` draws a box per mode, implementation and phase.
//!
//! Modules: `config` (flags, modes, errors), `raw` (the raw program),
//! `ours` (the memory manager's path), `report`, this file (the area, the
//! phases, the command).

mod config;
mod ours;
mod raw;
mod report;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use config::{DirtyArgs, DirtyBacking, DirtyError, DirtyMode};
pub use report::{DirtyReport, EnablePoint, Iteration, ModeResult, ModeRun, GOAL_RATIO};

use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::HostMapping;
use crate::plan::Command;
use ours::OursVm;
use raw::RawVm;

/// Guest-physical base of the measured memory: 8 GiB, clear of the bench
/// VM's own slots.
pub const AREA_BASE: u64 = 8 << 30;

/// One memslot of the area.
#[derive(Debug, Clone, Copy)]
pub struct AreaSlot {
    /// Offset of its first byte from [`AREA_BASE`].
    pub gpa_offset: u64,
    /// Offset of its first byte in the area's mapping.
    pub host_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The measured memory: one host mapping cut into memslots of equal
/// granule counts, the last taking the remainder.
#[derive(Debug, Clone)]
pub struct Area {
    /// The host memory.
    pub mapping: Arc<HostMapping>,
    /// Its memslots, in guest-physical order.
    pub slots: Vec<AreaSlot>,
}

impl Area {
    /// `total` bytes of `backing` in `slots` slots. With `gaps`, each slot's
    /// host window starts one granule after the previous one ends, so the
    /// memory manager (which merges neighbours contiguous in guest and host
    /// address, as the kernel merges VMAs) keeps them apart.
    pub fn new(
        backing: DirtyBacking,
        total: u64,
        slots: u64,
        gaps: bool,
    ) -> Result<Self, DirtyError> {
        let g = backing.granule();
        let units = total / g;
        let per = units / slots;
        let gap = if gaps { g } else { 0 };
        let cut: Vec<AreaSlot> = (0..slots)
            .map(|i| {
                let n = if i + 1 == slots { units - i * per } else { per };
                AreaSlot {
                    gpa_offset: i * per * g,
                    host_offset: i * (per * g + gap),
                    len: n * g,
                }
            })
            .collect();
        let host_len = total + gap * slots;
        let mapping = Arc::new(HostMapping::new(&backing.kind(), host_len)?);
        Ok(Self {
            mapping,
            slots: cut,
        })
    }

    /// Bytes of guest memory.
    pub fn len(&self) -> u64 {
        self.slots.iter().map(|s| s.len).sum()
    }

    /// Whether it is empty (never, for a built area).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The phases both implementations run.
trait Tracker {
    fn phase(&mut self, commands: Vec<Vec<Command>>) -> Result<Duration, DirtyError>;
    fn enable(&self) -> Result<Duration, DirtyError>;
    fn disable(&self) -> Result<Duration, DirtyError>;
    fn collect(&mut self, out: &mut Vec<u64>) -> Result<Duration, DirtyError>;
    fn clear(&mut self) -> Result<Duration, DirtyError>;
    fn clears_in_collect(&self) -> bool;
}

macro_rules! tracker {
    ($t:ty) => {
        impl Tracker for $t {
            fn phase(&mut self, c: Vec<Vec<Command>>) -> Result<Duration, DirtyError> {
                <$t>::phase(self, c)
            }
            fn enable(&self) -> Result<Duration, DirtyError> {
                <$t>::enable(self)
            }
            fn disable(&self) -> Result<Duration, DirtyError> {
                <$t>::disable(self)
            }
            fn collect(&mut self, out: &mut Vec<u64>) -> Result<Duration, DirtyError> {
                <$t>::collect(self, out)
            }
            fn clear(&mut self) -> Result<Duration, DirtyError> {
                <$t>::clear(self)
            }
            fn clears_in_collect(&self) -> bool {
                <$t>::clears_in_collect(self)
            }
        }
    };
}
tracker!(RawVm);
tracker!(OursVm);

/// vCPU `i` writes every `step`-th page of its `size` bytes.
fn touches(vcpus: u64, size: u64, step: u64) -> Vec<Vec<Command>> {
    (0..vcpus)
        .map(|i| {
            let r = GpaRange::new(Gpa(AREA_BASE + i * size), size).expect("inside the window");
            vec![Command::touch(r, step * PAGE_SIZE, true)]
        })
        .collect()
}

/// The GFNs `touches(vcpus, size, step)` writes, sorted.
fn written_gfns(vcpus: u64, size: u64, step: u64) -> Vec<u64> {
    let pages = size / PAGE_SIZE;
    let base = AREA_BASE / PAGE_SIZE;
    (0..vcpus)
        .flat_map(|i| {
            (0..pages)
                .step_by(step as usize)
                .map(move |p| base + i * pages + p)
        })
        .collect()
}

/// How many of `wrote` (sorted) are not in `got`, and the first of them.
fn missing(wrote: &[u64], got: &[u64]) -> (u64, Option<u64>) {
    let mut got = got.to_vec();
    got.sort_unstable();
    let mut lost = wrote.iter().filter(|g| got.binary_search(g).is_err());
    let first = lost.next().copied();
    (first.map_or(0, |_| 1 + lost.count() as u64), first)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The phases of one mode on one implementation.
fn measure(
    t: &mut dyn Tracker,
    who: &'static str,
    mode: DirtyMode,
    args: &DirtyArgs,
) -> Result<ModeRun, DirtyError> {
    let (_, step) = args.written_per_vcpu();
    let wrote = written_gfns(args.vcpus, args.size, step);
    let populate = t.phase(touches(args.vcpus, args.size, 1))?;
    let enable = t.enable()?;
    let mut pages = Vec::new();
    let mut iterations = Vec::new();
    for k in 1..=args.iterations {
        if let Some(signal) = crate::bench::interrupt::caught() {
            return Err(crate::bench::BenchError::Interrupted(signal).into());
        }
        let vcpu = t.phase(touches(args.vcpus, args.size, step))?;
        let collect = t.collect(&mut pages)?;
        let clear = t.clear()?;
        if let (missing, Some(first)) = missing(&wrote, &pages) {
            return Err(DirtyError::Lost {
                who,
                mode,
                iteration: k,
                got: pages.len() as u64,
                wrote: wrote.len() as u64,
                missing,
                first,
            });
        }
        iterations.push(Iteration {
            vcpu_ns: nanos(vcpu),
            collect_ns: nanos(collect),
            clear_ns: nanos(clear),
            pages: pages.len() as u64,
        });
    }
    let disable = t.disable()?;
    Ok(ModeRun::new(
        nanos(populate),
        nanos(enable),
        nanos(disable),
        t.clears_in_collect(),
        iterations,
    ))
}

fn run_raw(mode: DirtyMode, args: &DirtyArgs, ring: u64) -> Result<ModeRun, DirtyError> {
    let area = Area::new(args.backing, args.size * args.vcpus, args.slots, false)?;
    let mut vm = RawVm::new(mode, area, args.vcpus, ring)?;
    measure(&mut vm, "raw", mode, args)
}

fn run_ours(mode: DirtyMode, args: &DirtyArgs, ring: u64) -> Result<ModeRun, DirtyError> {
    let area = Area::new(args.backing, args.size * args.vcpus, args.slots, true)?;
    let mut vm = OursVm::new(mode, area, args.vcpus, ring)?;
    let run = measure(&mut vm, "ours", mode, args);
    vm.finish();
    run
}

/// Times an enable is repeated in the scan (each after a disable); the
/// median is reported: one enable on a loaded 2-core host can be delayed by
/// milliseconds.
const ENABLE_REPEATS: usize = 3;

/// Median of `ENABLE_REPEATS` enable times (each followed by a disable).
fn enable_median(t: &mut dyn Tracker) -> Result<f64, DirtyError> {
    let mut ms = Vec::new();
    for _ in 0..ENABLE_REPEATS {
        ms.push(t.enable()?.as_secs_f64() * 1e3);
        t.disable()?;
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Enable time at `size` of guest memory, all written first (1 vCPU, 1 slot).
fn enable_point(
    mode: DirtyMode,
    ours: bool,
    size: u64,
    args: &DirtyArgs,
    ring: u64,
) -> Result<f64, DirtyError> {
    let cmds = touches(1, size, 1);
    if ours {
        let mut vm = OursVm::new(mode, Area::new(args.backing, size, 1, true)?, 1, ring)?;
        let took = vm.phase(cmds).and_then(|_| enable_median(&mut vm));
        vm.finish();
        took
    } else {
        let mut vm = RawVm::new(mode, Area::new(args.backing, size, 1, false)?, 1, ring)?;
        vm.phase(cmds)?;
        enable_median(&mut vm)
    }
}

/// Runs every mode of `args` (and the enable scan), printing as it goes.
///
/// # Errors
/// Invalid flags or a mode the host lacks ([`DirtyError::ModeUnavailable`],
/// [`DirtyError::RingTooSmall`]: exit 2), any failure of a VM, guest or
/// ioctl, or pages lost.
pub fn run_dirty(args: &DirtyArgs, out: &mut dyn Write) -> Result<DirtyReport, DirtyError> {
    args.validate()?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| DirtyError::Kvm {
        what: "opening /dev/kvm".into(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let (manual, ring_max) = raw::host_modes(&kvm);
    drop(kvm);
    let has = |m: DirtyMode| match m {
        DirtyMode::Bitmap => Ok(()),
        DirtyMode::Manual if manual => Ok(()),
        DirtyMode::Manual => Err(DirtyError::ModeUnavailable {
            mode: m,
            cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially-set",
        }),
        DirtyMode::Ring if ring_max > 0 => Ok(()),
        DirtyMode::Ring => Err(DirtyError::ModeUnavailable {
            mode: m,
            cap: "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
        }),
    };
    let modes: Vec<DirtyMode> = if args.modes.is_empty() {
        DirtyMode::ALL
            .into_iter()
            .filter(|&m| has(m).is_ok())
            .collect()
    } else {
        for &m in &args.modes {
            has(m)?;
        }
        args.modes.clone()
    };
    let (per_vcpu, step) = args.written_per_vcpu();
    let ring = if modes.contains(&DirtyMode::Ring) {
        raw::ring_entries(per_vcpu, ring_max)?
    } else {
        0
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut report = DirtyReport {
        vcpus: args.vcpus,
        size_per_vcpu: args.size,
        slots: args.slots,
        write_percent: args.write_percent,
        pages_written: per_vcpu * args.vcpus,
        backing: args.backing,
        ring_entries: ring,
        loadavg,
        goal_ratio: GOAL_RATIO,
        modes: Vec::new(),
        enable_scan: Vec::new(),
    };
    let _ = writeln!(
        out,
        "bench dirty: KVM dirty_log_perf_test method, ours (MemoryManager) vs a raw program; {} vCPU(s) x {} {}, {} slot(s), 1 page in {} written ({} pages per iteration), {} iterations; loadavg {}",
        args.vcpus,
        crate::bench::fmt_size(args.size),
        args.backing,
        args.slots,
        step,
        report.pages_written,
        args.iterations,
        report.loadavg
    );
    for (k, &mode) in modes.iter().enumerate() {
        // Alternate which goes first, so a drifting host hits both alike.
        let (raw_run, ours_run) = if k % 2 == 0 {
            let r = run_raw(mode, args, ring)?;
            (r, run_ours(mode, args, ring)?)
        } else {
            let o = run_ours(mode, args, ring)?;
            (run_raw(mode, args, ring)?, o)
        };
        let r = report::ModeResult::new(mode, raw_run, ours_run);
        report::print_mode(out, &r);
        report.modes.push(r);
    }
    for &size in &args.enable_scan {
        for &mode in &modes {
            for ours in [false, true] {
                let ms = enable_point(mode, ours, size, args, ring)?;
                report.enable_scan.push(EnablePoint {
                    mode,
                    implementation: if ours { "ours" } else { "raw" },
                    size,
                    enable_ms: ms,
                });
            }
        }
    }
    report::print_summary(out, &report);
    Ok(report)
}

/// `vmm bench dirty` with parsed flags: runs, prints, writes the plot;
/// returns the exit status (0 all measured, 1 a failure, 2 invalid flags or
/// a mode the host lacks).
pub fn dirty(args: &DirtyArgs) -> i32 {
    if let Err(e) = args.validate() {
        eprintln!("vmm: {e}");
        return 2;
    }
    let plot = match args
        .plot
        .as_deref()
        .map(|p| std::fs::File::create(p).map(|f| (f, p)))
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            eprintln!(
                "vmm: {}",
                DirtyError::Output {
                    what: "the plot",
                    path: args.plot.clone().unwrap_or_default(),
                    reason: e.to_string(),
                }
            );
            return 2;
        }
    };
    let status = measure_and_report(args, plot);
    if status != 0 && status != 1 {
        if let Some(p) = &args.plot {
            let _ = std::fs::remove_file(p);
        }
    }
    status
}

fn measure_and_report(args: &DirtyArgs, plot: Option<(std::fs::File, &Path)>) -> i32 {
    if let Err(e) = crate::bench::interrupt::install() {
        eprintln!("vmm: cannot catch SIGINT/SIGTERM: {e}");
        return 1;
    }
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let report = match run_dirty(args, &mut *out) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: {e}");
            if let Some(p) = &args.plot {
                let _ = std::fs::remove_file(p);
            }
            return match e {
                DirtyError::ModeUnavailable { .. } | DirtyError::RingTooSmall { .. } => 2,
                _ => 1,
            };
        }
    };
    if let Some((mut file, path)) = plot {
        let written = crate::bench::plot::svg(&report::plot_series(&report))
            .map_err(|e| e.to_string())
            .and_then(|svg| file.write_all(svg.as_bytes()).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("vmm: writing the plot {}: {e}", path.display());
            return 1;
        }
        let _ = writeln!(out, "plot: {}", path.display());
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("vmm: cannot encode the report: {e}");
                return 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_area_slots_cover_the_memory_with_host_gaps_only_when_asked() {
        let a = Area::new(DirtyBacking::Anon, 10 * PAGE_SIZE, 3, true).unwrap();
        let lens: Vec<u64> = a.slots.iter().map(|s| s.len / PAGE_SIZE).collect();
        assert_eq!(lens, [3, 3, 4]);
        assert_eq!(a.slots[1].gpa_offset, 3 * PAGE_SIZE);
        assert_eq!(a.slots[1].host_offset, 4 * PAGE_SIZE);
        assert_eq!(a.len(), 10 * PAGE_SIZE);
        let b = Area::new(DirtyBacking::Thp, 8 << 20, 2, false).unwrap();
        assert_eq!(b.slots[1].host_offset, b.slots[1].gpa_offset);
        assert_eq!(b.slots[1].gpa_offset, 4 << 20);
    }

    #[test]
    fn test_missing_names_written_pages_not_collected() {
        let wrote = written_gfns(2, 8 * PAGE_SIZE, 3);
        let base = AREA_BASE / PAGE_SIZE;
        assert_eq!(wrote, [0, 3, 6, 8, 11, 14].map(|p| base + p));
        let mut got = wrote.clone();
        got.reverse();
        got.push(base + 1);
        assert_eq!(missing(&wrote, &got), (0, None));
        got.retain(|&g| g != base + 11 && g != base + 3);
        assert_eq!(missing(&wrote, &got), (2, Some(base + 3)));
    }

    #[test]
    fn test_touches_split_the_memory_per_vcpu() {
        let c = touches(2, 1 << 20, 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1][0].args[0], AREA_BASE + (1 << 20));
        assert_eq!(c[1][0].args[2], 10 * PAGE_SIZE);
    }
}
