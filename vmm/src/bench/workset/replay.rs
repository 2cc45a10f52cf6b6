//! The comparison a replay reports: the same configuration's first-touch
//! pass without prefetch and after prefetching the recorded set, per round.

use serde::Serialize;

use super::Prefetch;

/// One side of the comparison, averaged per round.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayPass {
    /// KVM `pf_fixed` during the timed pass.
    pub pf_fixed: f64,
    /// userfaultfd faults the handler served during the timed pass.
    pub uffd_faults: f64,
    /// Sum of the guest's access latencies (the time the guest waited), ms.
    pub guest_ms: f64,
    /// Wall time of the pass, ms.
    pub wall_ms: f64,
}

/// Faults and time saved by prefetching the recorded working set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayResult {
    /// How the set was prefetched.
    pub prefetch: Prefetch,
    /// Pages in the recorded set.
    pub pages: u64,
    /// Host time the prefetch took per round, ms.
    pub prefetch_ms: f64,
    /// The pass without prefetch.
    pub without: ReplayPass,
    /// The pass after the prefetch.
    pub with: ReplayPass,
    /// `pf_fixed` saved per round.
    pub pf_fixed_saved: f64,
    /// userfaultfd faults saved per round.
    pub uffd_faults_saved: f64,
    /// Guest waiting time saved per round, ms.
    pub guest_ms_saved: f64,
    /// Guest time saved minus the prefetch's own time, ms (what a restore
    /// that prefetches before resuming the guest gains).
    pub net_ms_saved: f64,
    /// uffd-copy with reads: whether the guest's VERIFY of the prefetched
    /// and demand-copied content passed in the run with prefetch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_verified: Option<bool>,
}

impl ReplayResult {
    /// The comparison of `without` and `with` (both per round).
    pub fn new(
        prefetch: Prefetch,
        pages: u64,
        prefetch_ms: f64,
        without: ReplayPass,
        with: ReplayPass,
    ) -> Self {
        let guest_ms_saved = without.guest_ms - with.guest_ms;
        Self {
            prefetch,
            pages,
            prefetch_ms,
            pf_fixed_saved: without.pf_fixed - with.pf_fixed,
            uffd_faults_saved: without.uffd_faults - with.uffd_faults,
            guest_ms_saved,
            net_ms_saved: guest_ms_saved - prefetch_ms,
            without,
            with,
            with_verified: None,
        }
    }

    /// The terminal lines.
    pub fn render(&self) -> String {
        let row = |name: &str, p: &ReplayPass| {
            format!(
                "    {name:<22} {:>10.0} {:>12.0} {:>10.3} {:>10.3}\n",
                p.pf_fixed, p.uffd_faults, p.guest_ms, p.wall_ms
            )
        };
        let mut out = format!(
            "  replay of {} recorded pages, prefetch {} ({:.3} ms per round)\n    {:<22} {:>10} {:>12} {:>10} {:>10}\n",
            self.pages, self.prefetch, self.prefetch_ms, "per round", "pf_fixed", "uffd faults", "guest ms", "wall ms"
        );
        out += &row("no prefetch", &self.without);
        out += &row(&format!("after prefetch {}", self.prefetch), &self.with);
        if let Some(v) = self.with_verified {
            out += &format!(
                "    guest verified the content after prefetch: {}\n",
                if v { "ok" } else { "MISMATCH" }
            );
        }
        out += &format!(
            "    saved: pf_fixed {:.0}, uffd faults {:.0}, guest time {:.3} ms, net of the prefetch {:.3} ms\n",
            self.pf_fixed_saved, self.uffd_faults_saved, self.guest_ms_saved, self.net_ms_saved
        );
        if self.without.guest_ms > 0.0 {
            out += &format!(
                "    guest time after/without prefetch: ratio {:.3}; prefetch + guest time / without: {:.3}\n",
                self.with.guest_ms / self.without.guest_ms,
                (self.prefetch_ms + self.with.guest_ms) / self.without.guest_ms
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_replay_savings_are_differences() {
        let without = ReplayPass {
            pf_fixed: 100.0,
            uffd_faults: 100.0,
            guest_ms: 5.0,
            wall_ms: 9.0,
        };
        let with = ReplayPass {
            pf_fixed: 13.0,
            uffd_faults: 0.0,
            guest_ms: 1.0,
            wall_ms: 4.0,
        };
        let r = ReplayResult::new(Prefetch::Copy, 100, 1.5, without, with);
        assert_eq!((r.pf_fixed_saved, r.uffd_faults_saved), (87.0, 100.0));
        assert_eq!((r.guest_ms_saved, r.net_ms_saved), (4.0, 2.5));
        assert!(r.render().contains("after prefetch copy"));
    }
}
