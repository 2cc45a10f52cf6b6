//! Which op caused which slow access: every timed access above the pass's
//! p99 is charged to the churn op whose `[start, end)` window overlaps it
//! most (all on the host TSC), or to none; per op kind the table says how
//! many ops ran, how many outliers they caused, and the median and largest
//! extra latency (access latency minus the pass's median).
//!
//! ```
//! use vmm::bench::{attribute, TimedAccess, OpWindow};
//! let mut accesses: Vec<TimedAccess> =
//!     (0..200).map(|i| TimedAccess { start: i * 100, ticks: 10 }).collect();
//! accesses[50].ticks = 5_000; // slow, inside the op's window
//! accesses[150].ticks = 4_000; // slow, no op near it
//! let ops = [OpWindow { kind: "protect", start: 5_000, end: 6_000, ok: true }];
//! let t = attribute(&accesses, &ops, 1.0);
//! let protect = t.rows.iter().find(|r| r.op == "protect").unwrap();
//! assert_eq!((protect.ops, protect.outliers), (1, 1));
//! assert_eq!(t.unattributed.outliers, 1);
//! ```

use std::fmt::Write as _;

use serde::Serialize;

use crate::bench::stats::fmt_ns;

/// One timed guest access, on the host TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedAccess {
    /// Host TSC when the access started.
    pub start: u64,
    /// Its duration in TSC ticks.
    pub ticks: u64,
}

/// One op of the writer, on the host TSC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpWindow {
    /// The op kind's name.
    pub kind: &'static str,
    /// Host TSC before its first call.
    pub start: u64,
    /// Host TSC after its last call.
    pub end: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// One row of the table: an op kind, or the outliers no op overlapped.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CauseRow {
    /// Op kind (`(none)` for the unattributed row).
    pub op: String,
    /// Ops of this kind run during the pass.
    pub ops: u64,
    /// Of which failed.
    pub failed: u64,
    /// Outliers (accesses above p99) charged to this kind.
    pub outliers: u64,
    /// Median extra latency of those outliers, ns.
    pub median_extra_ns: f64,
    /// Largest extra latency, ns.
    pub max_extra_ns: f64,
    /// Every outlier's extra latency, ns (for merging rounds; not serialized).
    #[serde(skip)]
    pub extras_ns: Vec<f64>,
}

impl CauseRow {
    fn named(op: &str) -> Self {
        Self {
            op: op.to_string(),
            ..Self::default()
        }
    }

    fn finish(&mut self) {
        let mut x = self.extras_ns.clone();
        x.sort_by(f64::total_cmp);
        self.outliers = x.len() as u64;
        self.median_extra_ns = x.get(x.len() / 2).copied().unwrap_or(0.0);
        self.max_extra_ns = x.last().copied().unwrap_or(0.0);
    }

    fn absorb(&mut self, other: CauseRow) {
        self.ops += other.ops;
        self.failed += other.failed;
        self.extras_ns.extend(other.extras_ns);
        self.finish();
    }
}

/// The attribution of one pass's outliers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CauseTable {
    /// Latency above which an access is an outlier (the pass's p99), ns.
    pub threshold_ns: f64,
    /// The pass's median latency, ns (extra latency is measured from it).
    pub median_ns: f64,
    /// One row per op kind, in order of first appearance.
    pub rows: Vec<CauseRow>,
    /// Outliers no op window overlapped.
    pub unattributed: CauseRow,
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Length of the overlap of `[a0, a1)` and `[b0, b1)`, 0 if disjoint.
fn overlap(a0: u64, a1: u64, b0: u64, b1: u64) -> u64 {
    a1.min(b1).saturating_sub(a0.max(b0))
}

/// Charges every access above the p99 of `accesses` to the op of `ops`
/// whose window overlaps it most (an op window of zero length overlapping
/// counts as one tick), or to none. `ns_per_tick` converts to nanoseconds.
pub fn attribute(accesses: &[TimedAccess], ops: &[OpWindow], ns_per_tick: f64) -> CauseTable {
    let mut sorted: Vec<u64> = accesses.iter().map(|a| a.ticks).collect();
    sorted.sort_unstable();
    let threshold = quantile(&sorted, 0.99);
    let median = quantile(&sorted, 0.5);
    let mut rows: Vec<CauseRow> = Vec::new();
    let row_of = |rows: &mut Vec<CauseRow>, kind: &str| -> usize {
        rows.iter().position(|r| r.op == kind).unwrap_or_else(|| {
            rows.push(CauseRow::named(kind));
            rows.len() - 1
        })
    };
    for op in ops {
        let i = row_of(&mut rows, op.kind);
        rows[i].ops += 1;
        rows[i].failed += u64::from(!op.ok);
    }
    let mut by_start: Vec<&OpWindow> = ops.iter().collect();
    by_start.sort_by_key(|o| o.start);
    let longest = ops.iter().map(|o| o.end - o.start).max().unwrap_or(0);
    let mut unattributed = CauseRow::named("(none)");
    for a in accesses.iter().filter(|a| a.ticks > threshold) {
        let end = a.start + a.ticks.max(1);
        // Ops that start before the access ends and may still be running
        // when it starts (no window is longer than `longest`).
        let from = by_start.partition_point(|o| o.start + longest < a.start);
        let to = by_start.partition_point(|o| o.start < end);
        let cause = by_start[from..to]
            .iter()
            .map(|o| (overlap(a.start, end, o.start, o.end.max(o.start + 1)), *o))
            .filter(|&(len, _)| len > 0)
            .max_by_key(|&(len, o)| (len, std::cmp::Reverse(o.start)))
            .map(|(_, o)| o.kind);
        let extra = (a.ticks - median) as f64 * ns_per_tick;
        match cause {
            Some(kind) => {
                let i = row_of(&mut rows, kind);
                rows[i].extras_ns.push(extra);
            }
            None => unattributed.extras_ns.push(extra),
        }
    }
    for r in &mut rows {
        r.finish();
    }
    unattributed.finish();
    CauseTable {
        threshold_ns: threshold as f64 * ns_per_tick,
        median_ns: median as f64 * ns_per_tick,
        rows,
        unattributed,
    }
}

impl CauseTable {
    /// The row of op kind `op`.
    pub fn row(&self, op: &str) -> Option<&CauseRow> {
        self.rows.iter().find(|r| r.op == op)
    }

    /// The op kind that cost the guest the most: the largest total extra
    /// latency over the outliers charged to it (ties: more outliers), if any
    /// op caused one. Counting outliers alone would name an op that causes
    /// many small ones over one that holds accesses for milliseconds.
    pub fn top_cause(&self) -> Option<&str> {
        let total = |r: &CauseRow| r.extras_ns.iter().sum::<f64>();
        self.rows
            .iter()
            .filter(|r| r.outliers > 0)
            .max_by(|a, b| {
                (total(a), a.outliers)
                    .partial_cmp(&(total(b), b.outliers))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|r| r.op.as_str())
    }

    /// Adds another round's table (thresholds are kept from the first).
    pub fn merge(&mut self, other: CauseTable) {
        for r in other.rows {
            match self.rows.iter_mut().find(|x| x.op == r.op) {
                Some(x) => x.absorb(r),
                None => self.rows.push(r),
            }
        }
        self.unattributed.absorb(other.unattributed);
    }

    /// The terminal table.
    pub fn render(&self, pass: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  churn during {pass}: outliers are accesses above p99 = {}, extra = latency - p50 ({})",
            fmt_ns(self.threshold_ns),
            fmt_ns(self.median_ns)
        );
        let _ = writeln!(
            out,
            "    {:<12} {:>7} {:>7} {:>9} {:>13} {:>10}",
            "op", "ops", "failed", "outliers", "median extra", "max extra"
        );
        for r in self.rows.iter().chain(std::iter::once(&self.unattributed)) {
            let none = r.op == "(none)";
            let _ = writeln!(
                out,
                "    {:<12} {:>7} {:>7} {:>9} {:>13} {:>10}",
                r.op,
                if none { "-".into() } else { r.ops.to_string() },
                if none {
                    "-".into()
                } else {
                    r.failed.to_string()
                },
                r.outliers,
                if r.outliers > 0 {
                    fmt_ns(r.median_extra_ns)
                } else {
                    "-".into()
                },
                if r.outliers > 0 {
                    fmt_ns(r.max_extra_ns)
                } else {
                    "-".into()
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(n: u64) -> Vec<TimedAccess> {
        (0..n)
            .map(|i| TimedAccess {
                start: i * 100,
                ticks: 10,
            })
            .collect()
    }

    fn op(kind: &'static str, start: u64, end: u64) -> OpWindow {
        OpWindow {
            kind,
            start,
            end,
            ok: true,
        }
    }

    #[test]
    fn test_outlier_goes_to_the_op_overlapping_it_most() {
        let mut a = flat(1000);
        a[500].ticks = 1000; // [50_000, 51_000)
        let ops = [op("plug", 49_000, 50_100), op("dontneed", 50_200, 52_000)];
        let t = attribute(&a, &ops, 1.0);
        assert_eq!(t.row("dontneed").unwrap().outliers, 1);
        assert_eq!(t.row("plug").unwrap().outliers, 0);
        assert_eq!(t.row("dontneed").unwrap().max_extra_ns, 990.0);
        assert_eq!(t.top_cause(), Some("dontneed"));
    }

    /// Four short outliers of one op against three long ones of another:
    /// the op that cost more time is the top cause (outlier counts alone
    /// named the wrong one in a loaded run).
    #[test]
    fn test_top_cause_is_the_op_that_cost_the_most_time() {
        let mut a = flat(1000);
        for i in [100, 200, 300, 400] {
            a[i].ticks = 400; // 4 short outliers in dontneed windows
        }
        for i in [600, 700, 800] {
            a[i].ticks = 20_000; // 3 long ones in stall windows
        }
        let mut ops: Vec<OpWindow> = [100, 200, 300, 400]
            .iter()
            .map(|&i| op("dontneed", i * 100, i * 100 + 400))
            .collect();
        ops.extend(
            [600, 700, 800]
                .iter()
                .map(|&i| op("stall", i * 100, i * 100 + 20_000)),
        );
        let t = attribute(&a, &ops, 1.0);
        assert_eq!(t.row("dontneed").unwrap().outliers, 4);
        assert_eq!(t.row("stall").unwrap().outliers, 3);
        assert_eq!(t.top_cause(), Some("stall"));
    }

    #[test]
    fn test_outlier_outside_every_window_is_unattributed() {
        let mut a = flat(1000);
        a[10].ticks = 500;
        let t = attribute(&a, &[op("collapse", 90_000, 91_000)], 1.0);
        assert_eq!(t.unattributed.outliers, 1);
        assert_eq!(t.row("collapse").unwrap().outliers, 0);
        assert_eq!(t.row("collapse").unwrap().ops, 1);
        assert_eq!(t.top_cause(), None);
    }

    #[test]
    fn test_only_accesses_above_p99_are_outliers() {
        let mut a = flat(100);
        a[5].ticks = 20; // the p99 (99th of 100 values): not above it
        a[6].ticks = 30;
        let t = attribute(&a, &[op("protect", 0, 10_000)], 1.0);
        assert_eq!(t.threshold_ns, 20.0);
        assert_eq!(t.row("protect").unwrap().outliers, 1);
        assert_eq!(t.row("protect").unwrap().max_extra_ns, 20.0);
    }

    #[test]
    fn test_long_early_window_is_still_found() {
        let mut a = flat(1000);
        a[900].ticks = 5000;
        let ops = [op("stall", 0, 100_000), op("plug", 1000, 1010)];
        let t = attribute(&a, &ops, 2.0);
        assert_eq!(t.row("stall").unwrap().outliers, 1);
        assert_eq!(t.row("stall").unwrap().median_extra_ns, 2.0 * 4990.0);
    }

    #[test]
    fn test_merge_sums_rows_and_recomputes_medians() {
        let mut a = flat(1000);
        a[1].ticks = 110;
        let mut t = attribute(&a, &[op("plug", 0, 200)], 1.0);
        let mut b = flat(1000);
        b[1].ticks = 310;
        b[2].ticks = 210;
        let u = attribute(
            &b,
            &[op("plug", 0, 300), op("collapse", 10_000, 10_001)],
            1.0,
        );
        t.merge(u);
        let plug = t.row("plug").unwrap();
        assert_eq!((plug.ops, plug.outliers), (2, 3));
        assert_eq!((plug.median_extra_ns, plug.max_extra_ns), (200.0, 300.0));
        assert_eq!(t.row("collapse").unwrap().ops, 1);
        assert!(t.render("first-touch").contains("collapse"));
    }
}
