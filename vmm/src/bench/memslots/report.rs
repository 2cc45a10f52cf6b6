//! What `vmm bench memslots` reports: per test and slot count the
//! per-iteration times of ours and raw, their ratio against the goal, and
//! the published bare-metal figure beside them; the stress mode's
//! slowdowns. Plain data with a table printer; JSON through serde.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use super::config::Test;
use super::stress::StressResult;
use crate::bench::fmt_ns;

/// The goal: ours at most this many times raw, per test.
pub const GOAL_RATIO: f64 = 1.2;

/// A figure of the scalable-memslots series, measured with KVM's
/// `memslot_perf_test` on bare metal (Xeon 8167M) at 32k memslots.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Anchor {
    /// Time per iteration, microseconds.
    pub per_iteration_us: f64,
    /// Memslots of that run.
    pub slots: u64,
}

/// The series' figure for `test`, if it published one.
pub fn anchor(test: Test) -> Option<Anchor> {
    let (us, slots) = match test {
        Test::Map => (54_100.0, 8_194),
        Test::Unmap => (35_100.0, 32_764),
        Test::MoveActive => (78.6, 32_764),
        Test::MoveInactive => (88.0, 32_764),
        Test::UnmapChunked | Test::Rw => return None,
    };
    Some(Anchor {
        per_iteration_us: us,
        slots,
    })
}

/// One implementation's figures for one test.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Time to register the area's slots, ms.
    pub populate_ms: f64,
    /// Timed iterations (all rounds).
    pub iterations: usize,
    /// Median time per iteration, us.
    pub median_us: f64,
    /// Mean time per iteration, us.
    pub mean_us: f64,
    /// 90th percentile, us.
    pub p90_us: f64,
    /// Median of the host part alone (discards, moves, host accesses), us.
    pub host_median_us: f64,
}

impl Figures {
    /// Figures of `times` (whole iterations) and `host` (their host
    /// parts), with the populate time.
    pub fn new(populate: Duration, times: &[Duration], host: &[Duration]) -> Self {
        let mut host_us: Vec<f64> = host.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        host_us.sort_by(f64::total_cmp);
        let mut us: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
        Self {
            populate_ms: populate.as_secs_f64() * 1e3,
            iterations: us.len(),
            median_us: at(0.5),
            mean_us: us.iter().sum::<f64>() / us.len() as f64,
            p90_us: at(0.9),
            host_median_us: host_us
                .get(host_us.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(0.0),
        }
    }
}

/// One test at one slot count.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    /// The test.
    pub test: Test,
    /// Memslots in the VM (as KVM's `-s`).
    pub slots: u64,
    /// Slots over the test area.
    pub area_slots: u64,
    /// Pages per area slot (the last holds the remainder too).
    pub pages_per_slot: u64,
    /// Why the test did not run at this count (as KVM's test skips).
    pub skipped: Option<String>,
    /// The memory manager.
    pub ours: Option<Figures>,
    /// The raw ioctl loop.
    pub raw: Option<Figures>,
    /// Median ours / median raw.
    pub ratio: Option<f64>,
    /// The same for the host parts alone.
    pub host_ratio: Option<f64>,
    /// Whether the ratio meets [`GOAL_RATIO`].
    pub goal_met: Option<bool>,
    /// The bare-metal figure for this test.
    pub anchor: Option<Anchor>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct MemslotsReport {
    /// `KVM_CAP_NR_MEMSLOTS` here.
    pub kvm_max_slots: u64,
    /// /proc/loadavg at the start.
    pub loadavg: String,
    /// vCPUs running the guest.
    pub vcpus: u64,
    /// How the raw loop moved slots.
    pub raw_move: super::config::RawMove,
    /// What memslot moves and deletes invalidated in both VMs: `slot` or
    /// `all` (`--memslot-zap`).
    pub memslot_zap: &'static str,
    /// The goal ratio.
    pub goal_ratio: f64,
    /// Per test and slot count.
    pub tests: Vec<TestResult>,
    /// The stress mode, when run.
    pub stress: Vec<StressResult>,
}

fn us(v: f64) -> String {
    fmt_ns(v * 1e3)
}

/// The header of the table.
pub fn header(out: &mut dyn Write) {
    let _ = writeln!(
        out,
        "{:>14} {:>6} {:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>6} {:>4} {:>6} | {:>16}",
        "test",
        "slots",
        "pg/sl",
        "ours p50",
        "ours p90",
        "iters",
        "raw p50",
        "raw p90",
        "iters",
        "ratio",
        "goal",
        "host",
        "bare metal (32k)"
    );
}

/// One row of the table.
pub fn row(out: &mut dyn Write, r: &TestResult) {
    let anchor = r.anchor.map_or_else(
        || "-".to_string(),
        |a| format!("{} @{}", us(a.per_iteration_us), a.slots),
    );
    match (&r.ours, &r.raw, r.ratio) {
        (Some(o), Some(w), Some(ratio)) => {
            let _ = writeln!(
                out,
                "{:>14} {:>6} {:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>6.2} {:>4} {:>6.2} | {:>16}",
                r.test.to_string(),
                r.slots,
                r.pages_per_slot,
                us(o.median_us),
                us(o.p90_us),
                o.iterations,
                us(w.median_us),
                us(w.p90_us),
                w.iterations,
                ratio,
                if ratio <= GOAL_RATIO { "met" } else { "MISS" },
                r.host_ratio.unwrap_or(f64::NAN),
                anchor
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "{:>14} {:>6} {:>6} | skipped: {}",
                r.test.to_string(),
                r.slots,
                "-",
                r.skipped.as_deref().unwrap_or("not measured")
            );
        }
    }
}

/// The closing lines: the stress mode's figures, or the tests' populate
/// times, the goal and the notes.
pub fn summary(out: &mut dyn Write, report: &MemslotsReport) {
    for s in &report.stress {
        let _ = writeln!(
            out,
            "stress {}: guest {:.1} passes/s quiet, {:.1} with {:.0} slot add+delete pairs/s: slowdown {:.2}x",
            s.implementation, s.quiet_passes_per_s, s.churn_passes_per_s, s.pairs_per_s, s.slowdown
        );
    }
    if report.tests.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nslot setup (populate the area, one op per slot set):"
    );
    for r in &report.tests {
        if let (Some(o), Some(w)) = (&r.ours, &r.raw) {
            let _ = writeln!(
                out,
                "{:>14} {:>6}: ours {:>9.1} ms ({} slots in one apply), raw {:>9.1} ms ({} ioctls)",
                r.test.to_string(),
                r.slots,
                o.populate_ms,
                r.area_slots,
                w.populate_ms,
                r.area_slots
            );
        }
    }
    let measured: Vec<&TestResult> = report.tests.iter().filter(|r| r.ratio.is_some()).collect();
    let missed = measured
        .iter()
        .filter(|r| r.goal_met == Some(false))
        .count();
    let _ = writeln!(
        out,
        "\ngoal ours/raw <= {GOAL_RATIO} per test: {} of {} met",
        measured.len() - missed,
        measured.len()
    );
    let _ = writeln!(
        out,
        "bare metal: the scalable-memslots series, KVM's memslot_perf_test on a Xeon 8167M; this host \
         is a nested (PVM) guest with 2 vCPUs, so compare ours/raw ratios, not absolute times"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_figures_take_nearest_rank_percentiles() {
        let times: Vec<Duration> = (1..=10).map(Duration::from_micros).collect();
        let f = Figures::new(Duration::from_millis(3), &times, &times[..3]);
        assert_eq!(f.host_median_us, 2.0);
        assert_eq!((f.median_us, f.p90_us, f.iterations), (5.0, 9.0, 10));
        assert!((f.mean_us - 5.5).abs() < 1e-9);
        assert!((f.populate_ms - 3.0).abs() < 1e-9);
    }

    #[test]
    fn test_stress_summary_prints_both_implementations_figures() {
        let stress = |implementation, slowdown| StressResult {
            implementation,
            quiet_passes_per_s: 6000.0,
            churn_passes_per_s: 6000.0 / slowdown,
            slowdown,
            pairs_per_s: 2500.0,
        };
        let report = MemslotsReport {
            kvm_max_slots: 32_764,
            loadavg: String::new(),
            vcpus: 1,
            raw_move: super::super::config::RawMove::KvmMove,
            memslot_zap: "slot",
            goal_ratio: GOAL_RATIO,
            tests: Vec::new(),
            stress: vec![
                stress(super::super::workload::Impl::Ours, 560.0),
                stress(super::super::workload::Impl::Raw, 670.0),
            ],
        };
        let mut out = Vec::new();
        summary(&mut out, &report);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("stress ours: guest 6000.0 passes/s quiet"),
            "{text}"
        );
        assert!(text.contains("slowdown 670.00x"), "{text}");
        assert!(!text.contains("goal ours/raw"), "no tests ran: {text}");
    }

    #[test]
    fn test_anchors_are_the_series_figures() {
        assert_eq!(anchor(Test::MoveActive).unwrap().per_iteration_us, 78.6);
        assert_eq!(anchor(Test::Map).unwrap().slots, 8_194);
        assert!(anchor(Test::Rw).is_none());
    }
}
