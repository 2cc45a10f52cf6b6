//! Runs a scenario's timeline on its own thread while the vCPUs run: memory
//! ops go to the memory manager, guest steps go to the vCPUs' plans (see
//! [`super::guest`]), and every step's outcome is checked against its
//! expectation.
//!
//! The first step whose expectation fails ends the scenario: later steps are
//! not run. Closing the command channels then ends the guests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::devices::iommu::Iommu;
use crate::devices::pins::{Pin, PinManager};
use crate::mm::addr::Gpa;
use crate::mm::backing::BackingKind;
use crate::mm::manager::{Checker, MemoryManager, DEFAULT_FULL_EVERY};
use crate::units::fmt_duration;

use super::expect::Outcome;
use super::file::Scenario;
use super::guest::{guest_command, range, recv, Batch, POLL};
use super::invariants::StepInvariants;
use super::step::{self, Action, Guest};

pub use super::guest::{channel_pair, ChannelPlan, VcpuLink};

/// One step's result, for the console and the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// Its `do`.
    pub kind: String,
    /// What it did, in words.
    pub what: String,
    /// The expectation.
    pub expect: String,
    /// What happened ("ok", an outcome name...), with detail.
    pub actual: String,
    /// Whether the expectation held.
    pub passed: bool,
    /// Wall time of the step.
    pub micros: u64,
}

/// The outcome of a whole scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Its name.
    pub name: String,
    /// Whether every step ran and met its expectation.
    pub passed: bool,
    /// Steps that ran, in order.
    pub steps: Vec<StepReport>,
    /// Steps not run (after a failure or a stop).
    pub not_run: usize,
}

impl ScenarioReport {
    /// The one-line reason it failed, if it did.
    pub fn failure(&self) -> Option<String> {
        if let Some(s) = self.steps.iter().find(|s| !s.passed) {
            return Some(format!(
                "scenario {:?} step {} ({}): expected {}, got {}",
                self.name, s.step, s.what, s.expect, s.actual
            ));
        }
        (self.not_run > 0).then(|| {
            format!(
                "scenario {:?} stopped with {} steps not run",
                self.name, self.not_run
            )
        })
    }
}

/// Everything the driver needs.
#[allow(missing_debug_implementations)] // holds a console callback
pub struct Driver {
    /// The timeline.
    pub scenario: Arc<Scenario>,
    /// Guest memory.
    pub memory: Arc<MemoryManager>,
    /// Backing for plugs that name none.
    pub backing: BackingKind,
    /// One link per vCPU.
    pub links: Vec<VcpuLink>,
    /// Set when the run is stopping.
    pub stop: Arc<AtomicBool>,
    /// Pins guest memory for `pin` steps.
    pub pins: Arc<PinManager>,
    /// The DMA engine's IOMMU (`dirty-pages` reads its dirty bits,
    /// `stage2-dump` its table).
    pub iommu: Arc<Iommu>,
    /// Pins held by `pin` steps, by name.
    pub held: std::collections::BTreeMap<String, Pin>,
    /// Console lines.
    pub console: Box<dyn FnMut(String) + Send>,
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), for the terminal.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// "outcome: detail", or "ok" alone.
fn actual(kind: Outcome, detail: &str) -> String {
    if kind == Outcome::Ok && (detail.is_empty() || detail == "ok") {
        "ok".into()
    } else {
        format!("{kind}: {detail}")
    }
}

impl Driver {
    /// Runs every step; returns the report.
    pub fn run(mut self) -> ScenarioReport {
        let scenario = self.scenario.clone();
        let mut checker = Checker::new(scenario.full_check_every.unwrap_or(DEFAULT_FULL_EVERY));
        let mut invariants = StepInvariants::new(
            scenario
                .probe_kvm_every
                .unwrap_or(super::invariants::DEFAULT_PROBE_EVERY),
        );
        let mut steps = Vec::new();
        for (i, spec) in scenario.steps.iter().enumerate() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let started = Instant::now();
            let (what, mut actual, mut passed) = self.step(i + 1, spec, &mut checker);
            if passed && super::invariants::is_memory_op(&spec.action) {
                if let Err(v) = self.invariants_after_op(&mut invariants) {
                    actual = format!("{}: {v}", Outcome::Inconsistent);
                    passed = false;
                }
            }
            let report = StepReport {
                step: i + 1,
                kind: spec.kind().to_string(),
                what,
                expect: spec.expect.to_string(),
                actual,
                passed,
                micros: started.elapsed().as_micros() as u64,
            };
            let verdict = if passed {
                "as expected".to_string()
            } else {
                format!("FAILED: expected {}", report.expect)
            };
            (self.console)(format!(
                "step {}: {} -> {} ({verdict}, {}){}",
                report.step,
                report.what,
                report.actual,
                fmt_duration(started.elapsed()),
                spec.note
                    .as_deref()
                    .map(|n| format!("  # {}", escape_control(n)))
                    .unwrap_or_default()
            ));
            steps.push(report);
            if !passed {
                break;
            }
        }
        let not_run = scenario.steps.len() - steps.len();
        // The incremental checks look at what each op changed; one full
        // check at the end sees everything.
        let started = Instant::now();
        if let Err(e) = checker.full(&self.memory) {
            let report = StepReport {
                step: steps.len() + 1,
                kind: "check".into(),
                what: "final consistency check of KVM memslots against the map".into(),
                expect: "ok".into(),
                actual: format!("{}: {e}", Outcome::Inconsistent),
                passed: false,
                micros: started.elapsed().as_micros() as u64,
            };
            (self.console)(format!(
                "{}: {} -> {} (FAILED)",
                report.what, report.expect, report.actual
            ));
            steps.push(report);
        }
        ScenarioReport {
            name: scenario.title().to_string(),
            passed: not_run == 0 && steps.iter().all(|s| s.passed),
            steps,
            not_run,
        }
        // Dropping `self.links` closes the command channels: the guests stop.
    }

    fn step(
        &mut self,
        number: usize,
        spec: &step::Step,
        checker: &mut Checker,
    ) -> (String, String, bool) {
        let what = describe(&spec.action);
        let expect = &spec.expect;
        match &spec.action {
            Action::Sleep(s) => {
                let until = Instant::now() + s.duration.duration();
                // In slices, so a timeout or signal stops the scenario promptly.
                while let Some(left) = until
                    .checked_duration_since(Instant::now())
                    .filter(|l| !l.is_zero())
                {
                    if self.stop.load(Ordering::Acquire) {
                        return (what, Outcome::Stopped.to_string(), false);
                    }
                    std::thread::sleep(left.min(POLL));
                }
                return (what, "ok".into(), true);
            }
            Action::Pin(p) => {
                let (kind, detail) = self.pin(p);
                return (what, format!("{kind}: {detail}"), expect.accepts(kind));
            }
            Action::Unpin(u) => {
                let (kind, detail) = self.unpin(&u.name);
                return (what, format!("{kind}: {detail}"), expect.accepts(kind));
            }
            Action::Check(step::Check { pages: Some(want) }) => {
                let now = self.pins.account().pinned().charged();
                if now != *want {
                    let kind = Outcome::PinnedPages;
                    let detail = format!("{now} pages pinned, expected {want}");
                    return (what, format!("{kind}: {detail}"), expect.accepts(kind));
                }
            }
            Action::Wait(w) => return self.wait(what, w),
            _ => {}
        }
        let Some((command, judge)) = guest_command(&spec.action) else {
            let ran = super::ops::run_op_checked(
                &self.memory,
                &self.iommu,
                &spec.action,
                &self.backing,
                checker,
            );
            return match ran {
                Ok(detail) => (what, format!("ok: {detail}"), expect.accepts(Outcome::Ok)),
                Err(f) => {
                    let passed = expect.accepts(f.kind);
                    (what, format!("{}: {}", f.kind, f.message), passed)
                }
            };
        };
        let (vcpu, repeat, is_async) = spec.action.guest().unwrap_or((0, 1, false));
        let vcpus = self.links.len();
        let Some(link) = self.links.get_mut(vcpu as usize) else {
            return (what, format!("no vCPU {vcpu} (the VM has {vcpus})"), false);
        };
        let batch = Batch {
            command,
            count: repeat,
            judge,
            expect: expect.clone(),
        };
        link.progress.start();
        if link.batches.send(batch).is_err() {
            return (what, "the vCPU is gone".into(), false);
        }
        if is_async {
            link.pending = Some(number);
            return (what, format!("started {repeat} command(s)"), true);
        }
        match recv(link, &self.stop) {
            None => (what, "stopped before the guest answered".into(), false),
            Some(o) => (what, actual(o.last.0, &o.last.1), o.met),
        }
    }

    /// The invariants after a memory op ([`StepInvariants::after_op`]): the
    /// IOMMU's leaves only while no DMA can be filling it (no vCPU has an
    /// asynchronous command in flight: a synchronous one has finished), and
    /// hole probes likewise only then.
    fn invariants_after_op(
        &self,
        invariants: &mut StepInvariants,
    ) -> Result<(), super::invariants::Violation> {
        let idle = self.links.iter().all(|l| l.pending.is_none());
        invariants.after_op(&self.memory, &self.iommu, idle, idle)
    }

    /// `wait`: collects the vCPU's async batch, if it has one; with
    /// `completed`, waits (at most `within`) until that many of its
    /// commands have finished and leaves the rest running.
    fn wait(&mut self, what: String, w: &step::Wait) -> (String, String, bool) {
        let vcpu = w.vcpu;
        let vcpus = self.links.len();
        let Some(link) = self.links.get_mut(vcpu as usize) else {
            return (what, format!("no vCPU {vcpu} (the VM has {vcpus})"), false);
        };
        if let Some(k) = w.completed {
            let within = w
                .within
                .as_ref()
                .map_or(step::DEFAULT_WITHIN, |d| d.duration());
            let (actual, passed) = wait_for_some(link, k, within, &self.stop);
            return (what, actual, passed);
        }
        let Some(step) = link.pending.take() else {
            return (what, "0 outcome(s) as expected".into(), true);
        };
        match recv(link, &self.stop) {
            None => (what, "stopped before the guest answered".into(), false),
            Some(o) if !o.met => (what, format!("step {step}: {}", o.last.1), false),
            Some(o) => (what, format!("{} outcome(s) as expected", o.ran), true),
        }
    }

    /// `pin`: the driver holds named pins until `unpin` or the end of the
    /// scenario.
    /// A name already held is refused before anything is pinned: the held
    /// pin stays as it was.
    fn pin(&mut self, p: &step::Pin) -> (Outcome, String) {
        if let Some(held) = self
            .held
            .get(&p.name)
            .filter(|_| !crate::mutants::on("duplicate-pin-ok"))
        {
            return (
                Outcome::DuplicatePin,
                format!(
                    "a pin named {:?} (#{}) is already held; unpin it first",
                    p.name,
                    held.id()
                ),
            );
        }
        let revocable = p.revocable.unwrap_or(true);
        match self
            .pins
            .pin(Gpa(p.gpa.0), p.size.0, p.write.unwrap_or(true), revocable)
        {
            Ok(pin) => {
                let id = pin.id();
                self.held.insert(p.name.clone(), pin);
                let now = self.pins.account().pinned().charged();
                let kind = if revocable {
                    "revocable"
                } else {
                    "non-revocable"
                };
                (
                    Outcome::Ok,
                    format!("pin {:?} (#{id}, {kind}); {now} pages pinned now", p.name),
                )
            }
            Err(e) => (Outcome::from(&e), e.to_string()),
        }
    }

    fn unpin(&mut self, name: &str) -> (Outcome, String) {
        match self.held.remove(name) {
            Some(pin) => {
                let revoked = pin.is_revoked();
                drop(pin);
                let now = self.pins.account().pinned().charged();
                let how = if revoked {
                    "was revoked earlier"
                } else {
                    "unpinned"
                };
                (
                    Outcome::Ok,
                    format!("pin {name:?} {how}; {now} pages pinned now"),
                )
            }
            None => (Outcome::NoSuchPin, format!("no pin named {name:?}")),
        }
    }
}

/// `wait` with `completed = k`: waits (at most `within`) until `k` of the
/// vCPU's async commands have finished; the batch runs on, uncollected,
/// unless it has ended (then it is collected as a plain `wait` would).
fn wait_for_some(
    link: &mut VcpuLink,
    k: u64,
    within: Duration,
    stop: &AtomicBool,
) -> (String, bool) {
    let Some(step) = link.pending else {
        return ("the vCPU has no async commands to wait for".into(), false);
    };
    let ran = link
        .progress
        .wait_for(k, Instant::now().checked_add(within), stop);
    if !ran.ended {
        let done = ran.commands;
        return if done >= k {
            (format!("{done} of step {step}'s commands finished"), true)
        } else if stop.load(Ordering::Acquire) {
            (Outcome::Stopped.to_string(), false)
        } else {
            let within = fmt_duration(within);
            let why = format!(
                "timed out: {done} of step {step}'s commands finished within {within}, waiting for {k}"
            );
            (why, false)
        };
    }
    link.pending = None;
    match recv(link, stop) {
        None => ("stopped before the guest answered".into(), false),
        Some(o) if !o.met => (format!("step {step}: {}", o.last.1), false),
        Some(o) if o.ran < k => (
            format!("step {step} ended after {} command(s), before {k}", o.ran),
            false,
        ),
        Some(o) => (format!("{} outcome(s) as expected", o.ran), true),
    }
}

/// A step in words, e.g. `unplug [0x100000000, 0x100200000)`.
pub fn describe(action: &Action) -> String {
    let guest = action.guest().map(|(vcpu, repeat, is_async)| {
        let repeat = if repeat > 1 {
            format!(" x{repeat}")
        } else {
            String::new()
        };
        let asynchronous = if is_async { " (async)" } else { "" };
        (format!("vCPU {vcpu}: "), format!("{repeat}{asynchronous}"))
    });
    let (who, how) = guest.unwrap_or_default();
    let kind = action.kind();
    let body = match action {
        Action::Plug(p) => format!("plug {}", range(p.gpa.0, p.size.0)),
        Action::Unplug(u) => format!("unplug {}", range(u.gpa.0, u.size.0)),
        Action::Protect(p) => format!(
            "protect {} {}",
            range(p.gpa.0, p.size.0),
            match p.access {
                step::Access::Ro => "ro",
                step::Access::Rw => "rw",
            }
        ),
        Action::Move(m) => format!("move {} to {}", range(m.gpa.0, m.size.0), m.to),
        Action::Resize(r) => format!("resize slot at {} to {}", Gpa(r.gpa.0), r.new_size),
        Action::DirtyLog(d) => format!(
            "dirty-log {} {}",
            range(d.gpa.0, d.size.0),
            if d.on { "on" } else { "off" }
        ),
        Action::DirtyPages(d) => format!("dirty-pages {}", range(d.gpa.0, d.size.0)),
        Action::Stage2Dump(d) => match (d.gpa, d.size) {
            (Some(g), Some(s)) => format!("dump the IOMMU's stage-2 table in {}", range(g.0, s.0)),
            _ => "dump the IOMMU's stage-2 table".into(),
        },
        Action::PlugMany(p) => match p.count {
            Some(n) => format!("plug {} slots from {}", n.0, Gpa(p.gpa.0)),
            None => format!("plug slots from {} until the budget is full", Gpa(p.gpa.0)),
        },
        Action::Check(_) => "check KVM memslots against the map".into(),
        Action::Pin(p) => format!(
            "pin {:?} {} ({})",
            p.name,
            range(p.gpa.0, p.size.0),
            if p.revocable == Some(false) {
                "non-revocable"
            } else {
                "revocable"
            }
        ),
        Action::Unpin(u) => format!("unpin {:?}", u.name),
        Action::Sleep(s) => format!("sleep {}", escape_control(&s.duration.to_string())),
        Action::Wait(step::Wait {
            vcpu,
            completed: None,
            ..
        }) => format!("vCPU {vcpu}: wait for its async commands"),
        Action::Wait(step::Wait {
            vcpu,
            completed: Some(k),
            within,
        }) => format!(
            "vCPU {vcpu}: wait until {k} of its async commands finished (within {})",
            within.as_ref().map_or_else(
                || fmt_duration(step::DEFAULT_WITHIN),
                |d| escape_control(&d.to_string())
            )
        ),
        Action::DmaCopy(Guest { command: c, .. }) => {
            format!("DMA copy {} to {}", range(c.gpa.0, c.size.0), c.to)
        }
        Action::Read(Guest { command: c, .. }) => format!("read {}", Gpa(c.gpa.0)),
        Action::Write(Guest { command: c, .. }) => format!("write {}", Gpa(c.gpa.0)),
        Action::Spin(Guest { command: c, .. }) => format!("spin {}", c.iterations.0),
        Action::Fill(Guest { command: c, .. }) => format!("{kind} {}", range(c.gpa.0, c.size.0)),
        Action::Verify(Guest { command: c, .. }) => format!("{kind} {}", range(c.gpa.0, c.size.0)),
        Action::VerifyConst(Guest { command: c, .. }) => {
            format!("{kind} {}", range(c.gpa.0, c.size.0))
        }
        Action::Touch(Guest { command: c, .. }) => format!("{kind} {}", range(c.gpa.0, c.size.0)),
        Action::DmaFill(Guest { command: c, .. }) => {
            format!("{kind} {}", range(c.gpa.0, c.size.0))
        }
        Action::DmaChecksum(Guest { command: c, .. }) => {
            format!("{kind} {}", range(c.gpa.0, c.size.0))
        }
    };
    format!("{who}{body}{how}")
}
