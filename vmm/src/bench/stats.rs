//! Latency statistics: ticks to nanoseconds with the guest TSC frequency,
//! percentiles by nearest rank over the sorted samples, and KVM counter deltas.
//!
//! ```
//! use vmm::bench::stats::Summary;
//! // 1 GHz TSC: one tick is one nanosecond.
//! let s = Summary::from_ticks(&[5, 1, 3, 2, 4], 1_000_000);
//! assert_eq!((s.p50, s.max, s.mean), (3.0, 5.0, 3.0));
//! ```

use std::collections::BTreeMap;

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

/// The nearest-rank `q` quantile (0..=1) of sorted `v`; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    /// Summarises nanosecond samples (sorted or not).
    pub fn from_ns(samples: &[f64]) -> Self {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p| quantile(&v, p);
        Self {
            count: v.len() as u64,
            min: v.first().copied().unwrap_or(0.0),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: v.last().copied().unwrap_or(0.0),
            mean: if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
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

    #[test]
    fn test_quantile_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 500.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert_eq!(quantile(&v, 1.0), 1000.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn test_ticks_convert_with_tsc_khz() {
        assert_eq!(ticks_to_ns(3_000, 3_000_000), 1_000.0);
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
