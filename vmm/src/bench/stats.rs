//! Latency statistics: ticks to nanoseconds with the guest TSC frequency,
//! percentiles from an HDR histogram (`hdrhistogram`, 3 significant digits,
//! nearest rank; exact below 2048 ns), and KVM counter deltas.
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
