//! What `vmm bench dirty` reports: per mode and implementation the populate,
//! enable and disable times and each iteration's vCPU pass, collect and
//! clear times with the pages collected; ratios ours/raw per phase against
//! the goal (a phase one side does inside another, as the manager's report
//! clears what it returns, has no ratio of its own: collect + clear is
//! compared instead); the enable-time scan; the plot's series.

use std::io::Write;

use serde::Serialize;

use super::config::DirtyMode;
use crate::bench::fmt_ns;
use crate::bench::plot::Series;

/// The goal: ours at most this many times raw, per phase.
pub const GOAL_RATIO: f64 = 1.1;

/// One iteration's times (ns) and pages.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Iteration {
    /// The vCPUs' write pass (start to the last vCPU done).
    pub vcpu_ns: u64,
    /// Collecting the dirty pages.
    pub collect_ns: u64,
    /// Re-protecting them (0 where the collect did it).
    pub clear_ns: u64,
    /// Pages the collect returned.
    pub pages: u64,
}

/// One implementation's run of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    /// The guest's first write of all its memory, ms.
    pub populate_ms: f64,
    /// Turning dirty logging on, ms.
    pub enable_ms: f64,
    /// Turning it off at the end, ms.
    pub disable_ms: f64,
    /// Whether the collect also re-protects, so there is no clear phase
    /// (bitmap: `KVM_GET_DIRTY_LOG`; ours in every mode: a report clears
    /// what it returns).
    pub clear_in_collect: bool,
    /// Every iteration.
    pub iterations: Vec<Iteration>,
    /// Medians over the iterations, us: vCPU pass, collect, clear, and
    /// collect + clear.
    pub median_us: Phases,
}

/// A value per phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Phases {
    /// The vCPUs' write pass.
    pub vcpu: f64,
    /// Collect.
    pub collect: f64,
    /// Clear.
    pub clear: f64,
    /// Collect and clear of one iteration together.
    pub collect_and_clear: f64,
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2)
        .map_or(0.0, |&x| x as f64 / 1e3)
}

impl ModeRun {
    /// The run of these iterations with the setup times (ns).
    pub fn new(
        populate_ns: u64,
        enable_ns: u64,
        disable_ns: u64,
        clear_in_collect: bool,
        iterations: Vec<Iteration>,
    ) -> Self {
        let median_us = Phases {
            vcpu: median(iterations.iter().map(|i| i.vcpu_ns).collect()),
            collect: median(iterations.iter().map(|i| i.collect_ns).collect()),
            clear: median(iterations.iter().map(|i| i.clear_ns).collect()),
            collect_and_clear: median(
                iterations
                    .iter()
                    .map(|i| i.collect_ns + i.clear_ns)
                    .collect(),
            ),
        };
        Self {
            populate_ms: populate_ns as f64 / 1e6,
            enable_ms: enable_ns as f64 / 1e6,
            disable_ms: disable_ns as f64 / 1e6,
            clear_in_collect,
            iterations,
            median_us,
        }
    }
}

/// Ratio of two medians, where the baseline measured something.
fn ratio(ours: f64, raw: f64) -> Option<f64> {
    (raw > 0.0 && ours > 0.0).then(|| ours / raw)
}

/// One mode: both implementations.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// The mode.
    pub mode: DirtyMode,
    /// The raw program.
    pub raw: ModeRun,
    /// The memory manager.
    pub ours: ModeRun,
    /// Median ours / median raw per phase (where both have the phase).
    pub ratio: RatioPhases,
}

/// Ratios per phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RatioPhases {
    /// vCPU pass.
    pub vcpu: Option<f64>,
    /// Collect.
    pub collect: Option<f64>,
    /// Clear: only where both clear separately.
    pub clear: Option<f64>,
    /// Collect + clear: always, the comparison where one side clears inside
    /// its collect.
    pub collect_and_clear: Option<f64>,
    /// Why collect or clear has no ratio, if one has none.
    pub note: Option<&'static str>,
}

impl ModeResult {
    /// The result, with its ratios.
    pub fn new(mode: DirtyMode, raw: ModeRun, ours: ModeRun) -> Self {
        let (o, r) = (&ours.median_us, &raw.median_us);
        let same_phases = ours.clear_in_collect == raw.clear_in_collect;
        let both_clear = !ours.clear_in_collect && !raw.clear_in_collect;
        let note = match (ours.clear_in_collect, raw.clear_in_collect) {
            (true, true) => Some("both clear inside collect: no clear phase"),
            (true, false) => Some(
                "ours clears inside collect (a report re-protects what it returns), raw in a separate call: compare collect + clear",
            ),
            (false, true) => Some(
                "raw clears inside collect, ours in a separate call: compare collect + clear",
            ),
            (false, false) => None,
        };
        let ratio = RatioPhases {
            vcpu: ratio(o.vcpu, r.vcpu),
            collect: ratio(o.collect, r.collect).filter(|_| same_phases),
            clear: ratio(o.clear, r.clear).filter(|_| both_clear),
            collect_and_clear: ratio(o.collect_and_clear, r.collect_and_clear),
            note,
        };
        Self {
            mode,
            raw,
            ours,
            ratio,
        }
    }
}

/// Enabling dirty logging at one size.
#[derive(Debug, Clone, Serialize)]
pub struct EnablePoint {
    /// The mode.
    pub mode: DirtyMode,
    /// Ours or raw.
    pub implementation: &'static str,
    /// Guest memory (all of it written by the guest first), bytes.
    pub size: u64,
    /// Time to enable, ms (median of 3, each after a disable).
    pub enable_ms: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct DirtyReport {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory per vCPU, bytes.
    pub size_per_vcpu: u64,
    /// Memslots.
    pub slots: u64,
    /// Percent of pages written per iteration, as asked.
    pub write_percent: u32,
    /// Pages written per iteration by all vCPUs.
    pub pages_written: u64,
    /// Backing.
    pub backing: super::config::DirtyBacking,
    /// Dirty-ring entries per vCPU in ring mode (0 when not run).
    pub ring_entries: u64,
    /// /proc/loadavg at the start.
    pub loadavg: String,
    /// Goal ratio per phase.
    pub goal_ratio: f64,
    /// Per mode.
    pub modes: Vec<ModeResult>,
    /// The enable-time scan.
    pub enable_scan: Vec<EnablePoint>,
}

fn ns(v: u64) -> String {
    fmt_ns(v as f64)
}

fn ms(v: f64) -> String {
    fmt_ns(v * 1e6)
}

/// Prints one mode's runs.
pub fn print_mode(out: &mut dyn Write, r: &ModeResult) {
    let runs = [("raw", &r.raw), ("ours", &r.ours)];
    for (who, run) in runs {
        let _ = writeln!(
            out,
            "{:>7} {:>5}: populate {}, enable {}, disable {}",
            r.mode.to_string(),
            who,
            ms(run.populate_ms),
            ms(run.enable_ms),
            ms(run.disable_ms)
        );
        for (k, it) in run.iterations.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:>15} iteration {:>3}: vcpu pass {:>9}  collect {:>9}  clear {:>9}  pages {}",
                "",
                k + 1,
                ns(it.vcpu_ns),
                ns(it.collect_ns),
                ns(it.clear_ns),
                it.pages
            );
        }
    }
    let q = &r.ratio;
    let show = |v: Option<f64>| {
        v.map_or_else(
            || "n/a".to_string(),
            |x| format!("{x:.2} {}", if x <= GOAL_RATIO { "met" } else { "MISS" }),
        )
    };
    let _ = writeln!(
        out,
        "{:>7} ours/raw medians (goal <= {GOAL_RATIO}): vcpu pass {}, collect {}, clear {}, collect+clear {}{}",
        r.mode.to_string(),
        show(q.vcpu),
        show(q.collect),
        show(q.clear),
        show(q.collect_and_clear),
        q.note.map_or_else(String::new, |n| format!(" (n/a: {n})"))
    );
}

/// The ring's collect against the bitmap's (raw medians). The goal
/// compares collect phases, but they differ in what they include: the
/// bitmap's `KVM_GET_DIRTY_LOG` also write-protects again (its clear),
/// while the ring's collect only reads entries and its reset
/// (`KVM_RESET_DIRTY_RINGS`, which re-protects) is the clear phase. Both
/// ratios are printed so neither hides the other.
fn ring_against_bitmap(ring: &ModeRun, bitmap: &ModeRun, write_percent: u32) -> String {
    let base = bitmap.median_us.collect_and_clear.max(f64::MIN_POSITIVE);
    let q = ring.median_us.collect / base;
    let whole = ring.median_us.collect_and_clear / base;
    format!(
        "ring collect / bitmap collect (raw, medians): {q:.2} ({}; goal <= 1 for write sets under 10%{}); \
         with the ring's reset, which re-protects as the bitmap's collect does: {whole:.2}",
        if q <= 1.0 { "at or below" } else { "above" },
        if write_percent < 10 {
            ""
        } else {
            ": this run writes 10% or more, informational"
        }
    )
}

/// The goal lines that compare modes, and the enable scan.
pub fn print_summary(out: &mut dyn Write, report: &DirtyReport) {
    let raw = |m: DirtyMode| report.modes.iter().find(|r| r.mode == m).map(|r| &r.raw);
    if let (Some(ring), Some(bitmap)) = (raw(DirtyMode::Ring), raw(DirtyMode::Bitmap)) {
        let _ = writeln!(
            out,
            "{}",
            ring_against_bitmap(ring, bitmap, report.write_percent)
        );
    }
    if report.enable_scan.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nenable time by guest memory size (all of it written by the guest first):"
    );
    let mut keys: Vec<(DirtyMode, &str)> = Vec::new();
    for p in &report.enable_scan {
        if !keys.contains(&(p.mode, p.implementation)) {
            keys.push((p.mode, p.implementation));
        }
    }
    for (mode, who) in keys {
        let pts: Vec<&EnablePoint> = report
            .enable_scan
            .iter()
            .filter(|p| p.mode == mode && p.implementation == who)
            .collect();
        let cells: Vec<String> = pts
            .iter()
            .map(|p| format!("{} {}", crate::bench::fmt_size(p.size), ms(p.enable_ms)))
            .collect();
        let growth = match (pts.first(), pts.last()) {
            (Some(a), Some(b)) if pts.len() > 1 => format!(
                "; {}x the memory: {:.3}x the time",
                b.size / a.size.max(1),
                b.enable_ms / a.enable_ms.max(1e-9)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>7} {:>5}: {}{growth}",
            mode.to_string(),
            who,
            cells.join(", ")
        );
    }
}

/// Picks one phase's time out of an iteration.
type PhaseOf = fn(&Iteration) -> u64;

/// The plot: per mode and implementation, a box per phase over the
/// iterations.
pub fn plot_series(report: &DirtyReport) -> Vec<Series> {
    let mut out = Vec::new();
    for r in &report.modes {
        for (who, run) in [("raw", &r.raw), ("ours", &r.ours)] {
            let phases: [(&str, PhaseOf); 3] = [
                ("vcpu pass", |i| i.vcpu_ns),
                ("collect", |i| i.collect_ns),
                ("clear", |i| i.clear_ns),
            ];
            for (phase, get) in phases {
                let samples_ns: Vec<f64> = run.iterations.iter().map(|i| get(i) as f64).collect();
                if samples_ns.iter().all(|&x| x == 0.0) {
                    continue;
                }
                out.push(Series {
                    label: format!("{} {who} {phase}", r.mode),
                    samples_ns,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(vcpu: u64, collect: u64, clear: u64) -> Iteration {
        Iteration {
            vcpu_ns: vcpu,
            collect_ns: collect,
            clear_ns: clear,
            pages: 1,
        }
    }

    #[test]
    fn test_ring_against_bitmap_shows_the_ring_with_and_without_its_reset() {
        let bitmap = ModeRun::new(0, 0, 0, true, vec![it(1000, 100_000, 0)]);
        let ring = ModeRun::new(0, 0, 0, false, vec![it(1000, 50_000, 120_000)]);
        let line = ring_against_bitmap(&ring, &bitmap, 5);
        assert!(line.contains(": 0.50 (at or below;"), "{line}");
        assert!(
            line.ends_with("as the bitmap's collect does: 1.70"),
            "{line}"
        );
        assert!(!line.contains("informational"), "{line}");
        assert!(ring_against_bitmap(&ring, &bitmap, 10).contains("informational"));
    }

    #[test]
    fn test_ratios_are_of_medians_and_absent_where_raw_measured_nothing() {
        let raw = ModeRun::new(
            0,
            0,
            0,
            true,
            vec![it(1000, 100, 0), it(3000, 300, 0), it(2000, 200, 0)],
        );
        let ours = ModeRun::new(
            0,
            0,
            0,
            true,
            vec![it(2200, 220, 0), it(2200, 220, 0), it(9000, 1, 0)],
        );
        let r = ModeResult::new(DirtyMode::Bitmap, raw, ours);
        let q = r.ratio;
        assert!((q.vcpu.unwrap() - 1.1).abs() < 1e-9);
        assert!((q.collect.unwrap() - 1.1).abs() < 1e-9);
        assert!((q.collect_and_clear.unwrap() - 1.1).abs() < 1e-9);
        assert!(q.clear.is_none() && q.note.is_some());
    }

    #[test]
    fn test_a_clear_folded_into_collect_is_compared_as_collect_plus_clear_only() {
        let raw = ModeRun::new(0, 0, 0, false, vec![it(1000, 100, 300), it(1000, 100, 300)]);
        let ours = ModeRun::new(0, 0, 0, true, vec![it(1000, 440, 0), it(1000, 440, 0)]);
        let q = ModeResult::new(DirtyMode::Manual, raw.clone(), ours).ratio;
        assert!(q.collect.is_none() && q.clear.is_none(), "{q:?}");
        assert!((q.collect_and_clear.unwrap() - 1.1).abs() < 1e-9);
        assert!(q.note.unwrap().contains("ours clears inside collect"));
        let both = ModeResult::new(DirtyMode::Manual, raw.clone(), raw).ratio;
        assert_eq!(both.clear, Some(1.0));
        assert_eq!(both.collect, Some(1.0));
        assert!(both.note.is_none());
    }
}
