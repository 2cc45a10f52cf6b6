//! What a scenario memory step costs against the bare op, on real KVM.
//!
//! For N = 10 and 30,000 slots already registered (4 KiB slots 8 KiB apart),
//! a 2 MiB anonymous plug and its unplug are run three ways, interleaved:
//!
//! - *bare*: `HostMapping::new` + `MemoryManager::apply(plug)`, and
//!   `apply(unplug)`: the op alone;
//! - *step*: `scenario::ops::run_op_checked` with a [`Checker`] at its
//!   defaults (incremental check after each op, a 256-id sweep, a full check
//!   every 64 ops, amortized into the mean);
//! - *full*: `scenario::ops::run_op`, the full check after every op (what a
//!   step cost before the incremental check), fewer iterations.
//!
//! Prints mean and median per op, and the step/bare ratio. Goals: a step
//! costs at most 1 ms at 10 slots and 2 ms at 30,000 slots.
//!
//! Run by `scripts/bench-steps.sh [ITERATIONS]`; results in
//! `docs/benchmarks.md`.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm};
use vmm::devices::iommu::Iommu;
use vmm::mm::addr::{Gpa, HUGE_2M, PAGE_SIZE};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::manager::{Checker, MemoryManager};
use vmm::mm::slot_map::{PlugSpec, SlotFlags, SlotMapConfig};
use vmm::scenario::ops::{run_op, run_op_checked};
use vmm::scenario::{Action, Scenario};

type Res<T> = Result<T, Box<dyn Error>>;

const COUNTS: [u64; 2] = [10, 30_000];
const DEFAULT_ITERATIONS: usize = 1_000;
/// Iterations of the full-check-every-op variant (400 ms each at 30,000 slots
/// in a debug build).
const FULL_ITERATIONS: usize = 20;
/// Where the existing slots start, and where the measured op plugs.
const POP_BASE: u64 = 0x10_0000_0000;
const OP_GPA: u64 = 0x8_0000_0000;
const GOALS_MS: [f64; 2] = [1.0, 2.0];

/// Times of one kind of op.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn mean(&self) -> f64 {
        let total: Duration = self.0.iter().sum();
        total.as_secs_f64() * 1e3 / self.0.len().max(1) as f64
    }
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort();
        v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }
}

fn actions() -> Res<(Action, Action)> {
    let text = format!(
        "[[step]]\ndo = \"plug\"\ngpa = {OP_GPA}\nsize = {HUGE_2M}\nbacking = \"anon\"\n\
         [[step]]\ndo = \"unplug\"\ngpa = {OP_GPA}\nsize = {HUGE_2M}\n"
    );
    let s = Scenario::parse(&text)?;
    Ok((s.steps[0].action.clone(), s.steps[1].action.clone()))
}

struct Row {
    n: u64,
    bare: Samples,
    step: Samples,
    full: Samples,
}

fn run_n(kvm: &Kvm, config: SlotMapConfig, n: u64, iterations: usize) -> Res<Row> {
    let memory = Arc::new(MemoryManager::new(kvm.create_vm()?, config)?);
    let backing = Arc::new(HostMapping::new(&BackingKind::Anon, n * PAGE_SIZE)?);
    let plugs: Vec<PlugSpec> = (0..n)
        .map(|i| PlugSpec {
            gpa: Gpa(POP_BASE + i * 2 * PAGE_SIZE),
            size: PAGE_SIZE,
            mapping: backing.clone(),
            offset: i * PAGE_SIZE,
            flags: SlotFlags::NONE,
        })
        .collect();
    memory.apply(move |m| m.plug_many(plugs))?;
    memory.check_consistency()?;
    let iommu = Iommu::new(memory.clone());
    let (plug, unplug) = actions()?;
    let anon = BackingKind::Anon;
    let mut checker = Checker::default();
    let mut row = Row {
        n,
        bare: Samples::default(),
        step: Samples::default(),
        full: Samples::default(),
    };
    let bare = |row: &mut Row| -> Res<()> {
        let t = Instant::now();
        let mem = Arc::new(HostMapping::new(&anon, HUGE_2M)?);
        memory.apply(|m| m.plug(Gpa(OP_GPA), HUGE_2M, mem, 0, SlotFlags::NONE))?;
        row.bare.0.push(t.elapsed());
        let t = Instant::now();
        memory.apply(|m| m.unplug(Gpa(OP_GPA), HUGE_2M))?;
        row.bare.0.push(t.elapsed());
        Ok(())
    };
    for i in 0..iterations {
        bare(&mut row)?;
        for action in [&plug, &unplug] {
            let t = Instant::now();
            run_op_checked(&memory, &iommu, action, &anon, &mut checker)
                .map_err(|f| format!("step: {}", f.message))?;
            row.step.0.push(t.elapsed());
        }
        if i < FULL_ITERATIONS {
            for action in [&plug, &unplug] {
                let t = Instant::now();
                run_op(&memory, &iommu, action, &anon)
                    .map_err(|f| format!("full: {}", f.message))?;
                row.full.0.push(t.elapsed());
            }
        }
    }
    checker.full(&memory)?;
    Ok(row)
}

fn main() -> Res<()> {
    let iterations = match std::env::args().nth(1) {
        Some(a) => a
            .parse::<usize>()
            .map_err(|e| format!("ITERATIONS {a:?}: {e}"))?,
        None => DEFAULT_ITERATIONS,
    }
    .max(1);
    let kvm = Kvm::new()?;
    let config = SlotMapConfig {
        max_slots: u32::try_from(kvm.get_nr_memslots())?,
        read_only_supported: kvm.check_extension(Cap::ReadonlyMem),
        ..SlotMapConfig::default()
    };
    println!(
        "bench-steps: a scenario memory step (op + consistency check) vs the bare op; \
         2 MiB anon plug and unplug, {iterations} of each per N ({FULL_ITERATIONS} for \
         full-check-every-op); KVM_CAP_NR_MEMSLOTS {}",
        config.max_slots
    );
    println!(
        "{:>7}  {:>17}  {:>17}  {:>17}  {:>11}  {:>6}",
        "slots", "bare mean/median", "step mean/median", "full mean/median", "step/bare", "goal"
    );
    let mut ok = true;
    for (n, goal) in COUNTS.into_iter().zip(GOALS_MS) {
        let r = run_n(&kvm, config, n, iterations)?;
        let ratio = r.step.mean() / r.bare.mean();
        let met = r.step.mean() <= goal;
        ok &= met;
        println!(
            "{:>7}  {:>7.3}/{:>6.3} ms  {:>7.3}/{:>6.3} ms  {:>7.3}/{:>6.3} ms  {:>10.1}x  {}",
            r.n,
            r.bare.mean(),
            r.bare.median(),
            r.step.mean(),
            r.step.median(),
            r.full.mean(),
            r.full.median(),
            ratio,
            if met {
                format!("<= {goal} ms ok")
            } else {
                format!("> {goal} ms MISSED")
            }
        );
    }
    if !ok {
        return Err("a goal was missed".into());
    }
    Ok(())
}
