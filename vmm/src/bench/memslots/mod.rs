//! `vmm bench memslots`: KVM's `memslot_perf_test` and
//! `memslot_modification_stress_test` on the project's memory manager,
//! beside a raw loop of the same ioctls and host calls in the same run.
//!
//! For each slot count and test ([`Test`]), two VMs are built alike, each
//! with the CPL3 bench guest on its vCPUs and the test area cut into slots
//! ([`SlotLayout`]): in one the area is plugged and changed through
//! [`MemoryManager::apply`](crate::mm::manager::MemoryManager::apply) and
//! touched from the host through slot guards; in the other a minimal loop
//! issues `KVM_SET_USER_MEMORY_REGION` and `madvise` on a table of slots.
//! Only one of the two VMs exists at a time (each round builds its rigs
//! afresh, alternating which goes first): two VMs in one process share its
//! mm, so each one's `madvise` would also run the other's MMU notifier.
//! Every iteration is timed; the report
//! gives medians, the ratio ours/raw against the goal (at most 1.2), and
//! the published bare-metal figure of the scalable-memslots series beside
//! them. `--stress` instead measures how much adding and deleting a slot in
//! a loop slows vCPUs that dirty memory.
//!
//! Modules: `config` (flags, errors), `layout` (cutting an area into
//! slots), `target` (ours and raw), `workload` (the tests' iterations on a
//! bench VM), `stress`, `report`.

mod config;
mod layout;
mod report;
mod stress;
mod target;
mod workload;

use std::io::Write;

pub use config::{MemslotsArgs, MemslotsError, RawMove, Test, BASE_SLOTS};
pub use layout::SlotLayout;
pub use report::{anchor, Anchor, Figures, MemslotsReport, TestResult, GOAL_RATIO};
pub use stress::StressResult;
pub use workload::Impl;

use workload::{layout_for, Rig};

/// `vmm bench memslots` with parsed flags: runs and prints; returns the exit
/// status (0 measured, 1 failure, 2 invalid flags).
pub fn memslots(args: &MemslotsArgs) -> i32 {
    if let Err(e) = args.validate() {
        eprintln!("vmm: {e}");
        return 2;
    }
    if let Err(e) = crate::bench::interrupt::install() {
        eprintln!("vmm: cannot catch SIGINT/SIGTERM: {e}");
        return 1;
    }
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    match run_memslots(args, &mut *out) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("vmm: cannot encode the report: {e}");
                        return 1;
                    }
                }
            }
            0
        }
        Err(e @ MemslotsError::Slots { .. }) => {
            eprintln!("vmm: {e}");
            2
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

/// Runs every test of `args` at every slot count (or the stress mode),
/// printing the table to `out` as it goes.
///
/// # Errors
/// [`MemslotsError::Slots`] for a count above `KVM_CAP_NR_MEMSLOTS`; any
/// failure of a VM, the guest, an op or a check.
pub fn run_memslots(
    args: &MemslotsArgs,
    out: &mut dyn Write,
) -> Result<MemslotsReport, MemslotsError> {
    args.validate()?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| MemslotsError::Os {
        what: "opening /dev/kvm".into(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let max_slots = kvm.get_nr_memslots() as u64;
    drop(kvm);
    args.check_slots(max_slots)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut report = MemslotsReport {
        kvm_max_slots: max_slots,
        loadavg,
        vcpus: args.vcpus,
        raw_move: args.raw_move,
        memslot_zap: args.memslot_zap.name(),
        goal_ratio: GOAL_RATIO,
        tests: Vec::new(),
        stress: Vec::new(),
    };
    let _ = writeln!(
        out,
        "bench memslots: KVM memslot_perf_test method, ours (MemoryManager) vs raw ioctls, {} vCPU(s), \
         {} per implementation and round, {} rounds, raw moves by {}, memslot zap {} (both VMs); KVM_CAP_NR_MEMSLOTS {max_slots}; loadavg {}",
        args.vcpus,
        crate::units::fmt_duration(args.time),
        args.rounds,
        args.raw_move,
        args.memslot_zap,
        report.loadavg
    );
    if args.stress {
        for imp in [Impl::Ours, Impl::Raw] {
            report.stress.push(stress::run(
                imp,
                args.vcpus,
                args.stress_size,
                args.time,
                args.memslot_zap,
            )?);
        }
        report::summary(out, &report);
        return Ok(report);
    }
    report::header(out);
    for &slots in &args.slots {
        for test in args.tests() {
            let r = measure(test, slots, args)?;
            report::row(out, &r);
            report.tests.push(r);
        }
    }
    report::summary(out, &report);
    Ok(report)
}

/// One test at one slot count: both rigs, rounds alternating.
fn measure(test: Test, slots: u64, args: &MemslotsArgs) -> Result<TestResult, MemslotsError> {
    let mut result = TestResult {
        test,
        slots,
        area_slots: slots.saturating_sub(BASE_SLOTS),
        pages_per_slot: 0,
        skipped: None,
        ours: None,
        raw: None,
        ratio: None,
        host_ratio: None,
        goal_met: None,
        anchor: anchor(test),
    };
    let Some(layout) = layout_for(test, slots) else {
        result.skipped = Some(format!(
            "{} pages cannot give each of {} slots its share (KVM's test skips this count too)",
            test.area_pages(),
            result.area_slots
        ));
        return Ok(result);
    };
    result.pages_per_slot = layout.pages_per_slot;
    // One VM at a time, each round building its rigs afresh in that
    // round's order. Two VMs alive together share the process's mm, and a
    // `madvise` on either's memory then runs both VMs' MMU notifiers: with
    // both rigs built up front, whichever VM was built first paid ~20-35%
    // more per discard at 8,194 slots (unmap-chunked 1.18-1.35 with ours
    // built first, 0.86-0.93 with raw built first, the same binary).
    let (mut ours_times, mut raw_times) = (Vec::new(), Vec::new());
    let (mut ours_populate, mut raw_populate) = (None, None);
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Impl::Ours, Impl::Raw]
        } else {
            [Impl::Raw, Impl::Ours]
        };
        for which in order {
            let mut rig = Rig::new(
                test,
                layout,
                args.vcpus,
                which,
                args.raw_move,
                args.memslot_zap,
            )?;
            let policy = rig.zap_policy();
            if policy.zap != args.memslot_zap {
                return Err(MemslotsError::Mismatch(format!(
                    "--memslot-zap {} is not available: {policy}",
                    args.memslot_zap
                )));
            }
            let times = rig.run(args.time, true)?;
            let (into, populate) = match which {
                Impl::Ours => (&mut ours_times, &mut ours_populate),
                Impl::Raw => (&mut raw_times, &mut raw_populate),
            };
            into.extend(times);
            populate.get_or_insert(rig.populate);
            rig.finish();
        }
    }
    let split = |t: &[workload::Timed]| -> (Vec<_>, Vec<_>) {
        (
            t.iter().map(|x| x.whole).collect(),
            t.iter().map(|x| x.host).collect(),
        )
    };
    let (ours_whole, ours_host) = split(&ours_times);
    let (raw_whole, raw_host) = split(&raw_times);
    let o = Figures::new(ours_populate.unwrap_or_default(), &ours_whole, &ours_host);
    let w = Figures::new(raw_populate.unwrap_or_default(), &raw_whole, &raw_host);
    let ratio = o.median_us / w.median_us;
    result.ratio = Some(ratio);
    result.host_ratio = Some(o.host_median_us / w.host_median_us);
    result.goal_met = Some(ratio <= GOAL_RATIO);
    result.ours = Some(o);
    result.raw = Some(w);
    Ok(result)
}
