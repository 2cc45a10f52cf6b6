//! What `vmm bench faults` reports: the JSON document ([`FaultsReport`]) and
//! its terminal rendering (one table per configuration, then a comparison
//! when several backings ran).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::churn::attribution::CauseTable;
use super::config::{fmt_size, Backing, FaultsConfig};
use super::host::{HostFacts, Prefill};
use super::plot::Series;
use super::stats::{fmt_ns, log2_buckets, Log2Bucket, Summary};
use super::uffd::{Event, UffdCounts};
use super::workset::replay::ReplayResult;
use super::workset::Touch;

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct FaultsReport {
    /// Host facts that decide what kind of faults were measured.
    pub host: HostFacts,
    /// The settings shared by every configuration.
    pub settings: Settings,
    /// One result per backing, in the order given (those measured before
    /// an interruption).
    pub configurations: Vec<ConfigResult>,
    /// The signal that stopped the bench early, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<&'static str>,
    /// `--scaling`: pages/s against vCPU count, per backing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scaling: Vec<ScalingRow>,
}

/// One row of the `--scaling` table: a backing at a vCPU count.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// The backing.
    pub backing: String,
    /// vCPUs, each touching its own `--size` part.
    pub vcpus: u64,
    /// Pages touched (all vCPUs, all rounds).
    pub pages: u64,
    /// Pages per second of guest time on the slowest vCPU (as
    /// demand_paging_test reports it: all pages over the time until the
    /// last vCPU finished).
    pub pages_per_sec: f64,
    /// The raw baseline's pages per second, same definition.
    pub raw_pages_per_sec: Option<f64>,
    /// Median latency per access, ns.
    pub p50_ns: f64,
    /// 99th percentile, ns.
    pub p99_ns: f64,
    /// What the uffd handler did.
    pub uffd: Option<UffdCounts>,
}

impl FaultsReport {
    /// The boxes of the plot: each pass of each configuration, then its raw
    /// and host baselines.
    pub fn plot_series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for c in &self.configurations {
            for p in &c.passes {
                out.push(Series {
                    label: format!("{} {}", c.backing, p.pass),
                    samples_ns: p.samples_ns.clone(),
                });
                for (outcome, samples) in &p.samples_by_outcome {
                    out.push(Series {
                        label: format!("{} {} {outcome}", c.backing, p.pass),
                        samples_ns: samples.clone(),
                    });
                }
            }
            if let Some(b) = &c.baselines {
                if let Some(r) = &b.raw {
                    out.push(Series {
                        label: format!("{} raw KVM", c.backing),
                        samples_ns: r.samples_ns.clone(),
                    });
                }
                out.push(Series {
                    label: format!("{} host only", b.host_kind),
                    samples_ns: b.host_samples_ns.clone(),
                });
            }
        }
        out
    }
}

/// The settings of a run, echoed.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Test range bytes.
    pub size: u64,
    /// Access pattern.
    pub pattern: String,
    /// read or write.
    pub access: String,
    /// vCPUs.
    pub vcpus: u64,
    /// disjoint or shared.
    pub share: String,
    /// Guest page-table page size over the range.
    pub guest_page: String,
    /// Whether the re-fault pass ran.
    pub refault: bool,
    /// userfaultfd handler placement.
    pub uffd_cpu: String,
    /// Seed.
    pub seed: u64,
    /// Rounds per configuration (tool and raw baseline alternate order).
    pub rounds: u32,
    /// `--churn` ops, in the writer's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub churn: Vec<String>,
    /// `--prefetch` of a `--replay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<String>,
    /// One userfaultfd per vCPU part (else one for the range).
    pub uffd_per_vcpu: bool,
    /// Handler threads per userfaultfd.
    pub uffd_handlers: u64,
    /// Delay injected before each resolution, ns.
    pub handler_delay_ns: u64,
}

impl From<&FaultsConfig> for Settings {
    fn from(c: &FaultsConfig) -> Self {
        Self {
            size: c.size,
            pattern: c.pattern.to_string(),
            access: c.access.to_string(),
            vcpus: c.vcpus,
            share: c.share.to_string(),
            guest_page: c.guest_page.to_string(),
            refault: c.refault,
            uffd_cpu: c.uffd_cpu.to_string(),
            seed: c.seed,
            rounds: c.rounds,
            churn: c.churn.ops.iter().map(ToString::to_string).collect(),
            prefetch: c
                .workset
                .replay
                .as_ref()
                .map(|_| c.workset.prefetch.to_string()),
            uffd_per_vcpu: c.uffd_per_vcpu,
            uffd_handlers: c.uffd_handlers,
            handler_delay_ns: c.handler_delay.as_nanos() as u64,
        }
    }
}

/// One configuration (one backing).
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    /// The backing.
    pub backing: String,
    /// Why it did not run (e.g. hugetlb without reserved pages).
    pub skipped: Option<String>,
    /// The timed passes.
    pub passes: Vec<PassResult>,
    /// The raw-KVM and host-only baselines.
    pub baselines: Option<Baselines>,
    /// uffd-copy with reads: whether the guest's VERIFY of the copied pages passed.
    pub uffd_verified: Option<bool>,
    /// Remarks a reader needs.
    pub notes: Vec<String>,
    /// Guest TSC frequency used for the conversion.
    pub tsc_khz: u32,
    /// Rounds merged into this result.
    pub rounds: u32,
    /// Host memory filled before the guest ran (prefault, populate, a
    /// replay's prefetch), summed over rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill: Option<Prefill>,
    /// With `--replay`: faults and time saved by the prefetch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayResult>,
}

impl ConfigResult {
    /// A configuration that could not run on this host.
    pub fn skipped(backing: &Backing, reason: String) -> Self {
        Self {
            backing: backing.to_string(),
            skipped: Some(reason),
            passes: Vec::new(),
            baselines: None,
            uffd_verified: None,
            notes: Vec::new(),
            tsc_khz: 0,
            rounds: 0,
            prefill: None,
            replay: None,
        }
    }

    /// Adds the samples and counters of another round of the same
    /// configuration, then recomputes every summary and ratio.
    pub fn merge(&mut self, other: ConfigResult) {
        self.rounds += other.rounds;
        for (a, b) in self.passes.iter_mut().zip(other.passes) {
            let busy = |p: &PassResult| {
                if p.faults_per_sec > 0.0 {
                    p.accesses as f64 / p.faults_per_sec
                } else {
                    0.0
                }
            };
            let total_busy = busy(a) + busy(&b);
            a.accesses += b.accesses;
            a.faults_per_sec = if total_busy > 0.0 {
                a.accesses as f64 / total_busy
            } else {
                0.0
            };
            a.wall_ms += b.wall_ms;
            for (k, v) in b.kvm {
                *a.kvm.entry(k).or_default() += v;
            }
            if let (Some(x), Some(y)) = (a.uffd.as_mut(), b.uffd) {
                x.merge(&y);
            }
            a.samples_ns.extend(b.samples_ns);
            for (k, v) in b.samples_by_outcome {
                a.samples_by_outcome.entry(k).or_default().extend(v);
            }
            match (a.churn.as_mut(), b.churn) {
                (Some(x), Some(y)) => x.merge(y),
                (None, y) => a.churn = y,
                _ => {}
            }
        }
        match (self.prefill.as_mut(), other.prefill) {
            (Some(a), Some(b)) => a.merge(&b),
            (None, b) => self.prefill = b,
            _ => {}
        }
        if let (Some(a), Some(b)) = (self.baselines.as_mut(), other.baselines) {
            if let (Some(x), Some(y)) = (a.raw.as_mut(), b.raw) {
                let busy = |n: usize, pps: f64| if pps > 0.0 { n as f64 / pps } else { 0.0 };
                let total = busy(x.samples_ns.len(), x.pages_per_sec)
                    + busy(y.samples_ns.len(), y.pages_per_sec);
                let n = (x.samples_ns.len() + y.samples_ns.len()) as f64;
                x.pages_per_sec = if total > 0.0 { n / total } else { 0.0 };
                x.samples_ns.extend(y.samples_ns);
                x.refault_samples_ns.extend(y.refault_samples_ns);
            }
            a.host_samples_ns.extend(b.host_samples_ns);
        }
        if let (Some(a), Some(b)) = (self.uffd_verified, other.uffd_verified) {
            self.uffd_verified = Some(a && b);
        }
        for n in other.notes {
            if !self.notes.contains(&n) {
                self.notes.push(n);
            }
        }
        self.finish();
    }

    /// Recomputes every summary and ratio from the samples.
    pub fn finish(&mut self) {
        for p in &mut self.passes {
            p.latency_ns = Summary::from_ns(&p.samples_ns);
            p.histogram_log2 = log2_buckets(&p.samples_ns);
            p.latency_by_outcome = p
                .samples_by_outcome
                .iter()
                .map(|(k, v)| (k.clone(), Summary::from_ns(v)))
                .collect();
        }
        let tool = self.passes.first().map(|p| p.latency_ns.clone());
        if let (Some(b), Some(tool)) = (self.baselines.as_mut(), tool) {
            if let Some(r) = b.raw.as_mut() {
                r.first = Summary::from_ns(&r.samples_ns);
                r.refault = (!r.refault_samples_ns.is_empty())
                    .then(|| Summary::from_ns(&r.refault_samples_ns));
            }
            b.host = Summary::from_ns(&b.host_samples_ns);
            b.ratio_tool_to_raw = b.raw.as_ref().map(|r| ratio(tool.p50, r.first.p50));
            b.ratio_tool_to_raw_mean = b.raw.as_ref().map(|r| ratio(tool.mean, r.first.mean));
            b.ratio_guest_to_host = ratio(tool.p50, b.host.p50);
        }
    }

    /// The pass named `name`.
    pub fn pass(&self, name: &str) -> Option<&PassResult> {
        self.passes.iter().find(|p| p.pass == name)
    }
}

/// One timed pass over the range.
#[derive(Debug, Clone, Serialize)]
pub struct PassResult {
    /// `first-touch` or `re-fault`.
    pub pass: &'static str,
    /// Timed accesses (all vCPUs, all rounds).
    pub accesses: u64,
    /// Distinct 4 KiB pages touched per round.
    pub pages: u64,
    /// Per-access latency.
    pub latency_ns: Summary,
    /// Accesses per second of guest time on the busiest vCPU.
    pub faults_per_sec: f64,
    /// Wall time of the phase (including exits between commands).
    pub wall_ms: f64,
    /// KVM binary-stat deltas (VM and summed vCPU counters) that changed,
    /// summed over rounds.
    pub kvm: BTreeMap<String, i64>,
    /// What the userfaultfd handler did in this pass.
    pub uffd: Option<UffdCounts>,
    /// Latency per access in log2 buckets.
    pub histogram_log2: Vec<Log2Bucket>,
    /// uffd kinds: latency of the accesses by the outcome of their fault
    /// message (`resolved`, `eexist`, `eagain-retry`, `wake-only`, or
    /// `no-message` for an access no message of its vCPU was read for).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_outcome: BTreeMap<String, Summary>,
    /// Every sample, ns (not serialized).
    #[serde(skip)]
    pub samples_ns: Vec<f64>,
    /// The samples by outcome label (not serialized).
    #[serde(skip)]
    pub samples_by_outcome: BTreeMap<String, Vec<f64>>,
    /// The handler's events of the last round, pages as offsets from the
    /// range start (not serialized).
    #[serde(skip)]
    pub uffd_events: Vec<Event>,
    /// The kernel thread id of each vCPU thread, last round (not serialized).
    #[serde(skip)]
    pub vcpu_tids: Vec<u32>,
    /// Offsets of the touched pages from the range start, sorted (not serialized).
    #[serde(skip)]
    pub touched_pages: Vec<u64>,
    /// Offsets of the pages the uffd handler resolved, sorted (not serialized).
    #[serde(skip)]
    pub uffd_pages: Vec<u64>,
    /// With `--churn`: the outliers of this pass attributed to the ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<CauseTable>,
    /// With stamps (churn, record): every access of the first round on the
    /// host clock, in plan order (not serialized).
    #[serde(skip)]
    pub touches: Vec<Touch>,
}

impl PassResult {
    /// A KVM counter delta, 0 if it did not change.
    pub fn kvm(&self, name: &str) -> i64 {
        self.kvm.get(name).copied().unwrap_or(0)
    }
}

/// The raw KVM program's result.
#[derive(Debug, Clone, Serialize)]
pub struct RawBaseline {
    /// First-touch pass.
    pub first: Summary,
    /// Re-fault pass.
    pub refault: Option<Summary>,
    /// First pass: accesses per second of guest time on the slowest vCPU.
    pub pages_per_sec: f64,
    /// First-pass samples, ns (not serialized).
    #[serde(skip)]
    pub samples_ns: Vec<f64>,
    /// Re-fault samples, ns (not serialized).
    #[serde(skip)]
    pub refault_samples_ns: Vec<f64>,
}

/// Baselines of one configuration from the same invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    /// Raw minimal KVM program, identical pattern (uffd kinds: with a
    /// minimal handler, same mode, uffds, threads and delay).
    pub raw: Option<RawBaseline>,
    /// Tool median / raw median, first touch (goal <= 1.05; uffd kinds,
    /// whose raw baseline has its own minimal handler: <= 1.2).
    pub ratio_tool_to_raw: Option<f64>,
    /// Tool mean / raw mean, first touch.
    pub ratio_tool_to_raw_mean: Option<f64>,
    /// Host-only first touch, no VM (vCPU 0's accesses, one thread).
    pub host: Summary,
    /// Host memory kind of the floor.
    pub host_kind: String,
    /// Guest median / host median.
    pub ratio_guest_to_host: f64,
    /// Host samples, ns (not serialized).
    #[serde(skip)]
    pub host_samples_ns: Vec<f64>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn row(
    out: &mut String,
    name: &str,
    accesses: u64,
    s: &Summary,
    rate: Option<f64>,
    pf: Option<i64>,
) {
    let _ = writeln!(
        out,
        "  {name:<14} {accesses:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        fmt_ns(s.p50),
        fmt_ns(s.p90),
        fmt_ns(s.p99),
        fmt_ns(s.p999),
        fmt_ns(s.max),
        fmt_ns(s.mean),
        rate.map_or("-".into(), |r| format!("{r:.0}")),
        pf.map_or("-".into(), |p| p.to_string()),
    );
}

/// The tool/raw line of a configuration's table. Under `--churn` the raw
/// baseline runs without the writer, so the ratio measures the churn, not
/// the tool, and carries no goal.
fn tool_to_raw_line(cfg: &FaultsConfig, r: &ConfigResult, p50: f64, mean: f64) -> String {
    if !cfg.churn.ops.is_empty() {
        return format!(
            "  tool/raw ratio: median {p50:.3}, mean {mean:.3} (no goal: the tool's pass ran \
             beside --churn, the raw baseline without it)"
        );
    }
    let goal = if r.backing.starts_with("uffd-") {
        "1.2"
    } else {
        "1.05"
    };
    format!("  tool/raw ratio: median {p50:.3} (goal <= {goal}), mean {mean:.3}")
}

/// The terminal table of one configuration.
pub fn table(cfg: &FaultsConfig, r: &ConfigResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} — {} {}, {}, {} vCPU(s) {}, guest pages {}, {} round(s)",
        r.backing,
        cfg.pattern,
        cfg.access,
        fmt_size(cfg.size),
        cfg.vcpus,
        cfg.share,
        cfg.guest_page,
        r.rounds,
    );
    if let Some(why) = &r.skipped {
        let _ = writeln!(out, "  skipped: {why}");
        return out;
    }
    let _ = writeln!(
        out,
        "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "pass", "accesses", "p50", "p90", "p99", "p99.9", "max", "mean", "faults/s", "pf_fixed"
    );
    for p in &r.passes {
        row(
            &mut out,
            p.pass,
            p.accesses,
            &p.latency_ns,
            Some(p.faults_per_sec),
            Some(p.kvm("pf_fixed")),
        );
    }
    if let Some(b) = &r.baselines {
        if let Some(raw) = &b.raw {
            row(&mut out, "raw KVM", raw.first.count, &raw.first, None, None);
            if let Some(rf) = &raw.refault {
                row(&mut out, "raw re-fault", rf.count, rf, None, None);
            }
        }
        row(&mut out, "host only", b.host.count, &b.host, None, None);
        if let (Some(p50), Some(mean)) = (b.ratio_tool_to_raw, b.ratio_tool_to_raw_mean) {
            let _ = writeln!(out, "{}", tool_to_raw_line(cfg, r, p50, mean));
        }
        let _ = writeln!(
            out,
            "  guest/host median ratio {:.2} (host floor on {})",
            b.ratio_guest_to_host, b.host_kind
        );
    }
    for p in &r.passes {
        let mut line = format!(
            "  {}: {} pages x {} round(s), KVM pf_fixed {} pf_taken {} pages_4k {:+} pages_2m {:+} pages_1g {:+}",
            p.pass,
            p.pages,
            r.rounds,
            p.kvm("pf_fixed"),
            p.kvm("pf_taken"),
            p.kvm("pages_4k"),
            p.kvm("pages_2m"),
            p.kvm("pages_1g"),
        );
        if let Some(u) = &p.uffd {
            let _ = write!(
                line,
                "; uffd faults {} (writes {}): resolved {} eexist {} eagain-retry {} wake-only {}",
                u.faults, u.writes, u.resolved, u.eexist, u.eagain_retry, u.wake_only
            );
        }
        let _ = writeln!(out, "{line}");
        for (outcome, s) in &p.latency_by_outcome {
            let _ = writeln!(
                out,
                "    {outcome:<13} {:>9} accesses, p50 {:>9} p99 {:>9} max {:>9}",
                s.count,
                fmt_ns(s.p50),
                fmt_ns(s.p99),
                fmt_ns(s.max)
            );
        }
    }
    if let Some(v) = r.uffd_verified {
        let _ = writeln!(
            out,
            "  guest verified the content the handler mapped: {}",
            if v { "ok" } else { "MISMATCH" }
        );
    }
    out.push_str(&prefill_churn_replay(r));
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}

/// `populate` against `prefault` when both ran: host time to fill the same
/// range with `MADV_POPULATE_WRITE` against touching each page.
fn prefill_ratio(report: &FaultsReport) -> String {
    let ms = |name: &str| {
        report
            .configurations
            .iter()
            .find(|c| c.backing == name)
            .and_then(|c| c.prefill.as_ref())
            .map(|p| p.ms)
    };
    match (ms("populate"), ms("prefault")) {
        (Some(populate), Some(touch)) if touch > 0.0 => format!(
            "  host prefill: MADV_POPULATE_WRITE {populate:.1} ms vs touch {touch:.1} ms: ratio {:.3}\n",
            populate / touch
        ),
        _ => String::new(),
    }
}

/// The lines of a prefill, of each pass's churn table and of a replay.
fn prefill_churn_replay(r: &ConfigResult) -> String {
    let mut out = String::new();
    if let Some(p) = &r.prefill {
        let _ = writeln!(
            out,
            "  host prefill before the guest ({}): {} pages in {:.3} ms over {} round(s), {} call(s)",
            p.method, p.pages, p.ms, r.rounds, p.calls
        );
    }
    for p in &r.passes {
        if let Some(c) = &p.churn {
            out.push_str(&c.render(p.pass));
        }
    }
    if let Some(rp) = &r.replay {
        out.push_str(&rp.render());
    }
    out
}

/// Side-by-side medians when several backings ran.
pub fn comparison(report: &FaultsReport) -> String {
    let mut out = String::from("\ncomparison (first touch; ratios to the first configuration)\n");
    let base = report
        .configurations
        .iter()
        .find_map(|c| c.pass("first-touch"))
        .map_or(0.0, |p| p.latency_ns.p50);
    for c in &report.configurations {
        match c.pass("first-touch") {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "  {:<12} p50 {:>9}  p99 {:>9}  x{:.2}",
                    c.backing,
                    fmt_ns(p.latency_ns.p50),
                    fmt_ns(p.latency_ns.p99),
                    if base > 0.0 {
                        p.latency_ns.p50 / base
                    } else {
                        f64::NAN
                    }
                );
            }
            None => {
                let _ = writeln!(out, "  {:<12} skipped", c.backing);
            }
        }
    }
    out.push_str(&prefill_ratio(report));
    if !report.host.kvm_pdpe1gb {
        out.push_str(
            "  (1 GiB guest pages are unavailable on this host: KVM's CPUID lacks pdpe1gb)\n",
        );
    }
    out
}

/// The `--scaling` table: pages/s per vCPU count, one column per backing
/// (with the raw baseline's figure and tool/raw when it ran).
pub fn scaling_table(rows: &[ScalingRow]) -> String {
    let mut backings: Vec<&str> = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    for r in rows {
        if !backings.contains(&r.backing.as_str()) {
            backings.push(&r.backing);
        }
        if !counts.contains(&r.vcpus) {
            counts.push(r.vcpus);
        }
    }
    let mut out = String::from(
        "\nscaling: pages/s (all pages / guest time of the slowest vCPU; raw in brackets)\n",
    );
    let _ = write!(out, "  {:>5}", "vCPUs");
    for b in &backings {
        let _ = write!(out, " {b:>28}");
    }
    out.push('\n');
    for n in counts {
        let _ = write!(out, "  {n:>5}");
        for b in &backings {
            let cell = rows
                .iter()
                .find(|r| r.vcpus == n && r.backing == *b)
                .map_or("-".to_string(), |r| match r.raw_pages_per_sec {
                    Some(raw) => format!(
                        "{:.0} ({raw:.0}, x{:.2})",
                        r.pages_per_sec,
                        raw / r.pages_per_sec.max(f64::MIN_POSITIVE)
                    ),
                    None => format!("{:.0}", r.pages_per_sec),
                });
            let _ = write!(out, " {cell:>28}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::config::Backing;
    use crate::bench::ChurnOp;

    #[test]
    fn test_tool_to_raw_line_has_no_goal_beside_churn() {
        let mut cfg = FaultsConfig::small(1 << 20, Backing::ANON);
        let r = ConfigResult::skipped(&Backing::ANON, String::new());
        let plain = tool_to_raw_line(&cfg, &r, 1.01, 1.02);
        assert!(plain.contains("goal <= 1.05"), "{plain}");
        cfg.churn.ops = vec![ChurnOp::Protect];
        let churned = tool_to_raw_line(&cfg, &r, 3.0, 3.5);
        assert!(!churned.contains("goal <="), "{churned}");
        assert!(churned.contains("raw baseline without it"), "{churned}");
    }
}
