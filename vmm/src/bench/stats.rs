//! Latency statistics: ticks to nanoseconds with the guest TSC frequency,
//! percentiles from an HDR histogram (`hdrhistogram`, 3 significant digits,
//! nearest rank; exact below 2048 ns), KVM counter deltas, and the two
//! export forms of a latency distribution: log2 buckets (the form of
//! QEMU's postcopy page-request latency distribution) and HdrHistogram's
//! percentile distribution text (`.hgrm`, read by HdrHistogram's plotter).
//!
//! ```
//! use vmm::bench::Summary;
//! // 1 GHz TSC: one tick is one nanosecond.
//! let s = Summary::from_ticks(&[5, 1, 3, 2, 4], 1_000_000);
//! assert_eq!((s.p50, s.max, s.mean), (3.0, 5.0, 3.0));
//! ```

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of one set of per-access latencies, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Converts TSC ticks to nanoseconds at `tsc_khz`.
pub fn ticks_to_ns(ticks: u64, tsc_khz: u32) -> f64 {
    ticks as f64 * 1e6 / f64::from(tsc_khz.max(1))
}

/// `850ns`, `5.92us`, `1.20ms`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.2}us", ns / 1e3)
    } else {
        format!("{:.2}ms", ns / 1e6)
    }
}

/// Latencies in whole nanoseconds, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Latencies {
    /// The histogram of `samples` (ns; negative ones count as 0).
    pub fn new(samples: &[f64]) -> Self {
        let mut h = Histogram::new(3).expect("3 significant digits are valid");
        for &ns in samples {
            let v = ns.max(0.0).round() as u64;
            // Growing fails only past usize's range; clamp then.
            if h.record(v).is_err() {
                h.saturating_record(v);
            }
        }
        Self(h)
    }

    /// The nearest-rank `q` quantile (0..=1) in ns; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64
    }
}

impl Latencies {
    /// HdrHistogram's percentile distribution (`.hgrm`) of the samples,
    /// values in microseconds: the text `outputPercentileDistribution`
    /// prints, five steps per halving of the distance to 100 %.
    pub fn hgrm(&self) -> String {
        use std::fmt::Write as _;
        let h = &self.0;
        let mut out = format!(
            "{:>12} {:>14} {:>10} {:>14}\n\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        let mut total = 0;
        if !h.is_empty() {
            for v in h.iter_quantiles(5) {
                total += v.count_since_last_iteration();
                let q = v.quantile_iterated_to();
                let inv = if q < 1.0 {
                    format!("{:14.2}", 1.0 / (1.0 - q))
                } else {
                    format!("{:>14}", "")
                };
                let _ = writeln!(
                    out,
                    "{:12.3} {:2.12} {:10} {inv}",
                    v.value_iterated_to() as f64 / 1e3,
                    q,
                    total
                );
            }
        }
        let _ = writeln!(
            out,
            "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
            h.mean() / 1e3,
            h.stdev() / 1e3
        );
        let _ = writeln!(
            out,
            "#[Max     = {:12.3}, Total count    = {:12}]",
            h.max() as f64 / 1e3,
            h.len()
        );
        out
    }
}

/// One log2 bucket: samples in `[lo_ns, hi_ns)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Log2Bucket {
    /// Lower bound, ns (inclusive; the first bucket also holds 0).
    pub lo_ns: u64,
    /// Upper bound, ns (exclusive).
    pub hi_ns: u64,
    /// Samples in the bucket.
    pub count: u64,
}

/// The samples (ns) in log2 buckets `[2^k, 2^(k+1))`, from the lowest to
/// the highest non-empty bucket, empty buckets in between included (the
/// contiguous form QEMU reports its postcopy latencies in).
///
/// ```
/// use vmm::bench::log2_buckets;
/// let b = log2_buckets(&[1.0, 2.0, 3.0, 9.0]);
/// let counts: Vec<(u64, u64)> = b.iter().map(|b| (b.lo_ns, b.count)).collect();
/// // [0, 2) holds 1 ns; [2, 4) holds 2 and 3; [4, 8) is empty; [8, 16) holds 9.
/// assert_eq!(counts, vec![(0, 1), (2, 2), (4, 0), (8, 1)]);
/// ```
pub fn log2_buckets(samples_ns: &[f64]) -> Vec<Log2Bucket> {
    let mut counts = [0u64; 64];
    for &ns in samples_ns {
        let v = ns.max(0.0).round() as u64;
        counts[v.max(1).ilog2() as usize] += 1;
    }
    let Some(first) = counts.iter().position(|&c| c > 0) else {
        return Vec::new();
    };
    let last = counts.iter().rposition(|&c| c > 0).unwrap_or(first);
    (first..=last)
        .map(|k| Log2Bucket {
            lo_ns: if k == 0 { 0 } else { 1 << k },
            hi_ns: 1u64.checked_shl(k as u32 + 1).unwrap_or(u64::MAX),
            count: counts[k],
        })
        .collect()
}

/// Log2 buckets as text, one `lo_ns hi_ns count` line each.
pub fn log2_text(buckets: &[Log2Bucket]) -> String {
    let mut out = String::from("# lo_ns hi_ns count\n");
    for b in buckets {
        out.push_str(&format!("{} {} {}\n", b.lo_ns, b.hi_ns, b.count));
    }
    out
}

impl Summary {
    /// Summarises nanosecond samples (sorted or not): percentiles from the
    /// histogram, count, min, max and mean exact.
    pub fn from_ns(samples: &[f64]) -> Self {
        let h = Latencies::new(samples);
        let q = |p| h.quantile(p);
        let (min, max) = samples
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        let empty = samples.is_empty();
        Self {
            count: samples.len() as u64,
            min: if empty { 0.0 } else { min },
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: if empty { 0.0 } else { max },
            mean: if empty {
                0.0
            } else {
                samples.iter().sum::<f64>() / samples.len() as f64
            },
        }
    }

    /// Summarises TSC tick samples at `tsc_khz`.
    pub fn from_ticks(ticks: &[u64], tsc_khz: u32) -> Self {
        let ns: Vec<f64> = ticks.iter().map(|&t| ticks_to_ns(t, tsc_khz)).collect();
        Self::from_ns(&ns)
    }
}

/// `after - before` for every counter that changed (gauges such as
/// `pages_4k` may go down, hence signed).
pub fn counter_delta(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .filter_map(|(k, &v)| {
            let d = v as i64 - before.get(k).copied().unwrap_or(0) as i64;
            (d != 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantile(samples: &[f64], q: f64) -> f64 {
        Latencies::new(samples).quantile(q)
    }

    #[test]
    fn test_quantile_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 500.0);
        assert_eq!(quantile(&v, 0.9), 900.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert_eq!(quantile(&v, 1.0), 1000.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        // Large values keep 3 significant digits.
        let big = quantile(&[1.0, 123_456.0, 7_000_000.0], 0.5);
        assert!((big - 123_456.0).abs() / 123_456.0 < 1e-3, "{big}");
    }

    #[test]
    fn test_log2_buckets_are_contiguous_and_count_every_sample() {
        let b = log2_buckets(&[0.0, 1.0, 1000.0, 1023.0, 1024.0, 5e6]);
        assert_eq!(b.first().unwrap().lo_ns, 0);
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 6);
        let at = |lo| b.iter().find(|b| b.lo_ns == lo).unwrap().count;
        assert_eq!((at(0), at(512), at(1024)), (2, 2, 1));
        assert!(b.windows(2).all(|w| w[0].hi_ns == w[1].lo_ns));
        assert!(log2_buckets(&[]).is_empty());
        assert!(log2_text(&b).lines().count() == b.len() + 1);
    }

    #[test]
    fn test_hgrm_ends_at_the_max_with_every_sample() {
        // Exact below 2048 ns: the last row is the max itself, 1 us.
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let text = Latencies::new(&v).hgrm();
        let rows: Vec<Vec<f64>> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.contains("Value"))
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        let last = rows.last().unwrap();
        assert_eq!((last[0], last[1], last[2]), (1.0, 1.0, 1000.0), "{text}");
        assert!(rows
            .windows(2)
            .all(|w| w[0][1] <= w[1][1] && w[0][2] <= w[1][2]));
        assert!(text.contains("Total count    =         1000"), "{text}");
    }

    #[test]
    fn test_ticks_convert_with_tsc_khz() {
        assert_eq!(ticks_to_ns(3_000, 3_000_000), 1_000.0);
        assert_eq!(fmt_ns(5920.0), "5.92us");
        assert_eq!(fmt_ns(850.4), "850ns");
    }

    #[test]
    fn test_counter_delta_keeps_only_changes_signed() {
        let b = BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 9)]);
        let a = BTreeMap::from([
            ("a".to_string(), 5),
            ("b".to_string(), 2),
            ("c".to_string(), 1),
        ]);
        let d = counter_delta(&a, &b);
        assert_eq!(
            d,
            BTreeMap::from([("b".to_string(), -7), ("c".to_string(), 1)])
        );
    }
}
