//! The fault-latency baseline as a standalone program: the fewest KVM calls
//! that run one timed first-touch pass (`vmm::bench::raw_baseline`: plain
//! KVM_SET_USER_MEMORY_REGION, one loop per vCPU thread, no slot map, no
//! statistics; the uffd kinds with a minimal handler thread), printing its
//! percentiles. `vmm bench faults` runs the same code in-process and prints
//! the ratio; this binary lets you run it alone.
//!
//! ```sh
//! cargo run --release -p vmm --example raw_faults -- 64M anon seq
//! cargo run --release -p vmm --example raw_faults -- 16M uffd-minor seq
//! ```

use vmm::bench::{fmt_ns, raw_baseline, Backing, FaultsConfig, Pattern, Summary};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args
        .first()
        .map_or(Ok(64 << 20), |s| vmm::units::parse_size(s))
        .unwrap_or_else(|e| fail(&e));
    let backing: Backing = args
        .get(1)
        .map_or(Ok(Backing::ANON), |s| s.parse())
        .unwrap_or_else(|e| fail(&e.to_string()));
    let pattern: Pattern = args
        .get(2)
        .map_or(Ok(Pattern::Sequential), |s| s.parse())
        .unwrap_or_else(|e| fail(&e.to_string()));
    let cfg = FaultsConfig {
        pattern,
        ..FaultsConfig::small(size, backing.clone())
    };
    if let Err(e) = cfg.validate() {
        fail(&e.to_string());
    }
    let r = raw_baseline(&cfg, &backing).unwrap_or_else(|e| fail(&e.to_string()));
    let s = Summary::from_ticks(&r.first, r.tsc_khz);
    println!(
        "raw {backing} {pattern} {}: {} accesses p50 {} p90 {} p99 {} p99.9 {} max {} mean {}",
        args.first().map_or("64M", String::as_str),
        s.count,
        fmt_ns(s.p50),
        fmt_ns(s.p90),
        fmt_ns(s.p99),
        fmt_ns(s.p999),
        fmt_ns(s.max),
        fmt_ns(s.mean)
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("raw_faults: {msg}");
    std::process::exit(2)
}
