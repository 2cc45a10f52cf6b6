//! `vmm bench faults`: how long a guest waits on a page fault, and what
//! drives it.
//!
//! For each configuration (one per backing), a guest at CPL3 — where faults
//! are real under this host's shadow MMU — touches the pages of a test range
//! plugged at [`TEST_BASE`], times each access with `rdtsc` (the protocol's
//! TIMED_TOUCH) and stores the deltas in a result buffer that was faulted in
//! beforehand. The VMM converts ticks with `KVM_GET_TSC_KHZ`, reads KVM's
//! binary statistics between phases (every vCPU parked, so each delta
//! belongs to one phase), and reports percentiles, a JSON document and an
//! SVG plot. Baselines from the same invocation: a raw minimal KVM program
//! with the identical pattern ([`raw_baseline`]) and a host-only first
//! touch (no VM).
//!
//! The public face is [`faults`] (the command), [`run_faults`] (the
//! measurement as a library call) and the types they take and return; the
//! modules behind them are private. Modules, each importing only those
//! listed before it: `config` (flags), `stats` (percentiles, units),
//! `plot` (SVG), `host` (host facts, memory, floor), `uffd` (userfaultfd
//! handler), `plan` (the accesses), `error`, `report` (tables, JSON),
//! `progress` (bar), `guest` (the VM and vCPU threads), `raw` (baseline),
//! `raw_uffd` (the raw baseline's handler), `tsc` (the guest's clock on the
//! host's), `timeline` (a pass's accesses on that clock), `run` (phases and
//! baselines); `churn` (ops beside the timed guest and the attribution of
//! outliers to them) and `workset` (record, replay, prefetch) are public for
//! their types, their options are part of [`FaultsConfig`]; page tables come
//! from [`crate::boot::paging`], host memory from [`crate::mm::backing`].
//!
//! Threads: the main thread orchestrates phases; one thread per vCPU;
//! `--uffd-handlers` handler threads per userfaultfd for the uffd backings
//! (and as many in the raw baseline's minimal handler, `raw_uffd`); with
//! `--churn`, one writer thread per timed pass. No lock is held across a
//! phase or an ioctl; the shared state is the uffd fault log (an in-flight
//! count and a mutex-held list, see `uffd::log`), the handler's
//! resolved-page bitmap, the progress counter (a relaxed atomic, read for
//! display only), and for churn the writer's stop flag and the vCPUs'
//! wait-out-EFAULT flag (protocol in [`churn`]'s `run_ops`, checked by a
//! shuttle model).

pub mod churn;
mod config;
pub mod dirty;
mod error;
mod guest;
mod host;
mod interrupt;
pub mod memslots;
mod plan;
mod plot;
mod progress;
mod raw;
mod raw_stop;
#[cfg(all(test, vmm_shuttle))]
mod raw_stop_shuttle_tests;
mod raw_uffd;
mod report;
mod run;
mod stats;
mod timeline;
mod tsc;
mod uffd;
pub mod workset;

use std::fs::File;
use std::io::Write;
use std::path::Path;

pub use churn::attribution::{attribute, CauseRow, CauseTable, OpWindow, TimedAccess};
pub use churn::ops::ChurnOp;
pub use config::{
    fmt_size, Access, Backing, ConfigError, FaultsArgs, FaultsConfig, GuestPage, Pattern, Share,
    UffdCpu, MAX_ACCESSES_PER_VCPU, TEST_BASE,
};
pub use error::BenchError;
pub use host::Prefill;
pub use host::{kvm_has_pdpe1gb, HostFacts};
pub use raw::{run as raw_baseline, RawResult};
pub use report::{
    Baselines, ConfigResult, FaultsReport, PassResult, RawBaseline, ScalingRow, Settings,
};
pub use run::run_faults;
pub use stats::{fmt_ns, log2_buckets, ticks_to_ns, Log2Bucket, Summary};
pub use uffd::{Event as UffdEvent, Outcome as UffdOutcome, UffdCounts};
pub use workset::replay::{ReplayPass, ReplayResult};
pub use workset::{Prefetch, Workset, WorksetPage};

/// Opens the plot file before anything is measured, so a bad path fails in
/// milliseconds rather than after the whole bench.
fn create_output(what: &'static str, path: &Path) -> Result<File, ConfigError> {
    File::create(path).map_err(|e| ConfigError::Output {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Checks before measuring, creating nothing, that the histograms can go
/// into `dir`: an existing writable directory, or a new one in an existing
/// directory (created when the histograms are written).
fn histogram_dir(dir: &Path) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::Output {
        what: "the histograms into",
        path: dir.to_path_buf(),
        reason,
    };
    let (at, what) = match std::fs::metadata(dir) {
        Ok(_) => (dir, "it"),
        Err(_) => (
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
            "its parent",
        ),
    };
    let meta = std::fs::metadata(at).map_err(|e| bad(format!("{what}: {e}")))?;
    if !meta.is_dir() {
        return Err(bad(format!("{what} is not a directory")));
    }
    if meta.permissions().readonly() {
        return Err(bad(format!("{what} is read-only")));
    }
    Ok(())
}

/// Writes every pass's histogram (and, for the uffd kinds, each outcome's)
/// as `CONFIG-PASS[-OUTCOME].hgrm` and `.log2.txt`; returns the file count.
fn write_histograms(report: &FaultsReport, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut n = 0;
    let mut put = |name: String, samples: &[f64]| -> std::io::Result<()> {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        std::fs::write(
            dir.join(format!("{name}.hgrm")),
            stats::Latencies::new(samples).hgrm(),
        )?;
        std::fs::write(
            dir.join(format!("{name}.log2.txt")),
            stats::log2_text(&log2_buckets(samples)),
        )?;
        n += 2;
        Ok(())
    };
    for c in &report.configurations {
        for p in &c.passes {
            put(format!("{}-{}", c.backing, p.pass), &p.samples_ns)?;
            for (outcome, samples) in &p.samples_by_outcome {
                put(format!("{}-{}-{outcome}", c.backing, p.pass), samples)?;
            }
        }
        if let Some(raw) = c.baselines.as_ref().and_then(|b| b.raw.as_ref()) {
            put(format!("{}-raw", c.backing), &raw.samples_ns)?;
        }
    }
    Ok(n)
}

/// `vmm bench faults` with parsed flags: runs, prints, writes the plot;
/// returns the exit status (0 ok, 1 failure, 2 invalid configuration or
/// output path).
pub fn faults(args: &FaultsArgs) -> i32 {
    if let Err(e) = interrupt::install() {
        eprintln!("vmm: cannot catch SIGINT/SIGTERM: {e}");
        return 1;
    }
    let checked = args.to_config().and_then(|cfg| {
        if let Some(dir) = &args.histograms {
            histogram_dir(dir)?;
        }
        let plot = args
            .plot
            .as_deref()
            .map(|p| create_output("the plot", p).map(|f| (f, p)))
            .transpose()?;
        Ok((cfg, plot))
    });
    let (cfg, plot) = match checked {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 2;
        }
    };
    let status = measure_and_report(args, &cfg, plot);
    if status != 0 {
        if let Some(p) = &args.plot {
            let _ = std::fs::remove_file(p);
        }
    }
    status
}

fn measure_and_report(args: &FaultsArgs, cfg: &FaultsConfig, plot: Option<(File, &Path)>) -> i32 {
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let report = match run_faults(cfg, &mut *out) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: {e}");
            return if matches!(e, BenchError::Config(_)) {
                2
            } else {
                1
            };
        }
    };
    if let Some((mut file, path)) = plot {
        let written = plot::svg(&report.plot_series())
            .map_err(|e| e.to_string())
            .and_then(|svg| file.write_all(svg.as_bytes()).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("vmm: writing the plot {}: {e}", path.display());
            return 1;
        }
        let _ = writeln!(out, "plot: {}", path.display());
    }
    if let Some(dir) = &args.histograms {
        match write_histograms(&report, dir) {
            Ok(n) => {
                let _ = writeln!(out, "histograms: {n} files in {}", dir.display());
            }
            Err(e) => {
                eprintln!("vmm: writing the histograms into {}: {e}", dir.display());
                return 1;
            }
        }
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
    // One rule with `vmm run`: what was asked for and could not be measured
    // is a failure, with the reason; the rest is still reported.
    if let Some(signal) = &report.interrupted {
        eprintln!("vmm: interrupted by {signal}: reported the configurations measured before it");
        return 1;
    }
    let skipped: Vec<String> = report
        .configurations
        .iter()
        .filter_map(|c| {
            c.skipped
                .as_ref()
                .map(|why| format!("{}: {why}", c.backing))
        })
        .collect();
    if !skipped.is_empty() {
        eprintln!("vmm: could not measure {}", skipped.join("; "));
        return 1;
    }
    0
}
