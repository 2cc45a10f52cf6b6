//! Runs a scenario's timeline on its own thread while the vCPUs run: memory
//! ops go to the KVM applier, guest steps go to the vCPUs' [`ChannelPlan`]s,
//! and every step's outcome is checked against its expectation.
//!
//! The first step whose expectation fails ends the scenario: later steps are
//! not run. Closing the command channels then ends the guests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::devices::iommu::Iommu;
use crate::devices::pins::{Pin, PinError, PinManager};
use crate::failure::GuestFailure;
use crate::kvm::memslots::MemslotApplier;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::BackingKind;
use crate::plan::{Aborted, Command, CommandOutcome, Step, VcpuPlan};
use crate::units::fmt_duration;

use super::file::{Scenario, StepSpec};
use super::ops::run_op;

const POLL: Duration = Duration::from_millis(20);

/// A vCPU's plan under a scenario: commands arrive on a channel, outcomes go
/// back on another, and guest faults end only the command.
#[derive(Debug)]
pub struct ChannelPlan {
    commands: Receiver<Command>,
    outcomes: Sender<CommandOutcome>,
    stop: Arc<AtomicBool>,
}

impl VcpuPlan for ChannelPlan {
    fn next(&mut self) -> Result<Step, Aborted> {
        loop {
            match self.commands.recv_timeout(POLL) {
                Ok(c) => return Ok(Step::Run(c)),
                Err(RecvTimeoutError::Disconnected) => return Ok(Step::Stop),
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::Acquire) => {
                    return Err(Aborted)
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
    fn completed(&mut self, outcome: &CommandOutcome) {
        let _ = self.outcomes.send(outcome.clone());
    }
    fn recoverable(&self) -> bool {
        true
    }
}

/// The driver's end of one vCPU's channels.
#[derive(Debug)]
pub struct VcpuLink {
    commands: Sender<Command>,
    outcomes: Receiver<CommandOutcome>,
    /// Async commands not yet collected: (step number, expectation, kind).
    pending: VecDeque<(usize, String, String)>,
}

/// Creates the plan for a vCPU and the driver's link to it.
pub fn channel_pair(stop: Arc<AtomicBool>) -> (ChannelPlan, VcpuLink) {
    let (ctx, crx) = mpsc::channel();
    let (otx, orx) = mpsc::channel();
    (
        ChannelPlan {
            commands: crx,
            outcomes: otx,
            stop,
        },
        VcpuLink {
            commands: ctx,
            outcomes: orx,
            pending: VecDeque::new(),
        },
    )
}

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
    /// What happened ("ok", an error kind, "unplugged"...), with detail.
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
    pub memory: Arc<MemslotApplier>,
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

fn classify(
    outcome: &CommandOutcome,
    kind: &str,
    expected_value: Option<u64>,
) -> (&'static str, String) {
    use guest_image::protocol::dma_status;
    match outcome {
        CommandOutcome::Done { results } if kind.starts_with("dma-") => match results[0] {
            dma_status::DONE => match expected_value.filter(|_| kind == "dma-checksum") {
                Some(v) if results[1] != v => (
                    "wrong-value",
                    format!("checksum {:#x}, expected {v:#x}", results[1]),
                ),
                _ => ("ok", format!("DMA done (checksum {:#x})", results[1])),
            },
            dma_status::FAULT => (
                "dma-fault",
                "DMA fault: memory not plugged or not writable".into(),
            ),
            dma_status::NO_PIN => (
                "dma-no-pin",
                "DMA refused: the pin limit would be exceeded".into(),
            ),
            dma_status::REVOKED => ("dma-revoked", "DMA stopped: memory changed under it".into()),
            s => ("dma-invalid", format!("DMA invalid (status {s})")),
        },
        CommandOutcome::Done { results } => match expected_value {
            Some(v) if results[0] != v => (
                "wrong-value",
                format!("read {:#x}, expected {v:#x}", results[0]),
            ),
            _ => ("ok", "ok".into()),
        },
        CommandOutcome::Failed(f) => {
            let kind = match f {
                GuestFailure::VerifyMismatch { .. } => "mismatch",
                GuestFailure::UnpluggedAccess { .. } => "unplugged",
                GuestFailure::ReadOnlyWrite { .. } => "read-only",
                GuestFailure::Exception { .. } => "exception",
                _ => "failed",
            };
            (kind, f.to_string())
        }
    }
}

/// Whether outcome `kind` meets `expect`, which may list alternatives
/// separated by `|` (e.g. `"ok|dma-revoked"`).
fn meets(expect: &str, kind: &str) -> bool {
    expect.split('|').map(str::trim).any(|e| match e {
        "ok-or-unplugged" => kind == "ok" || kind == "unplugged",
        "failed" => kind != "ok",
        e => e == kind,
    })
}

fn pin_kind(e: &PinError) -> &'static str {
    match e {
        PinError::BadRange { .. } => "bad-range",
        PinError::NotPlugged { .. } => "not-plugged",
        PinError::ReadOnly { .. } => "read-only",
        PinError::Limit { .. } => "pin-limit",
        PinError::Mlock { .. } => "mlock",
        PinError::Busy { .. } => "busy",
    }
}

impl Driver {
    /// Runs every step; returns the report.
    pub fn run(mut self) -> ScenarioReport {
        let scenario = self.scenario.clone();
        let mut steps = Vec::new();
        for (i, spec) in scenario.steps.iter().enumerate() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let started = Instant::now();
            let expect = spec.expect.clone().unwrap_or_else(|| "ok".into());
            let (what, actual, passed) = self.step(i + 1, spec, &expect);
            let report = StepReport {
                step: i + 1,
                kind: spec.kind.clone(),
                what,
                expect,
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
                    .map(|n| format!("  # {n}"))
                    .unwrap_or_default()
            ));
            steps.push(report);
            if !passed {
                break;
            }
        }
        let not_run = scenario.steps.len() - steps.len();
        ScenarioReport {
            name: scenario.title().to_string(),
            passed: not_run == 0 && steps.iter().all(|s| s.passed),
            steps,
            not_run,
        }
        // Dropping `self.links` closes the command channels: the guests stop.
    }

    fn step(&mut self, number: usize, spec: &StepSpec, expect: &str) -> (String, String, bool) {
        let what = describe(spec);
        if spec.kind == "sleep" {
            let d = crate::units::parse_duration(spec.duration.as_deref().unwrap_or("0"))
                .unwrap_or_default();
            let until = Instant::now() + d;
            // In slices, so a timeout or signal stops the scenario promptly.
            while let Some(left) = until
                .checked_duration_since(Instant::now())
                .filter(|l| !l.is_zero())
            {
                if self.stop.load(Ordering::Acquire) {
                    return (what, "stopped".into(), false);
                }
                std::thread::sleep(left.min(POLL));
            }
            return (what, "ok".into(), true);
        }
        if spec.kind == "pin" || spec.kind == "unpin" {
            let (kind, detail) = self.pin_step(spec);
            let passed = meets(expect, kind) || (expect == "error" && kind != "ok");
            let actual = if kind == "ok" {
                format!("ok: {detail}")
            } else {
                format!("{kind}: {detail}")
            };
            return (what, actual, passed);
        }
        if spec.kind == "check" {
            if let Some(want) = spec.pages {
                let now = self.pins.account().pinned().charged();
                if now != want {
                    return (
                        what,
                        format!("pinned-pages: {now} pages pinned, expected {want}"),
                        false,
                    );
                }
            }
        }
        if !spec.is_guest() {
            return match run_op(&self.memory, &self.iommu, spec, &self.backing) {
                Ok(detail) => (what, format!("ok: {detail}"), meets(expect, "ok")),
                Err(f) => {
                    let passed = meets(expect, f.kind) || expect == "error";
                    (what, format!("{}: {}", f.kind, f.message), passed)
                }
            };
        }
        let vcpu = spec.vcpu.unwrap_or(0) as usize;
        let Some(link) = self.links.get_mut(vcpu) else {
            return (
                what,
                format!("no vCPU {vcpu} (the VM has {})", self.links.len()),
                false,
            );
        };
        if spec.kind == "wait" {
            let mut results = Vec::new();
            while let Some((step, expect, step_kind)) = link.pending.pop_front() {
                match recv(link, &self.stop) {
                    None => return (what, "stopped before the guest answered".into(), false),
                    Some(o) => {
                        let (kind, detail) = classify(&o, &step_kind, None);
                        if !meets(&expect, kind) {
                            return (what, format!("step {step}: {detail}"), false);
                        }
                        results.push(kind);
                    }
                }
            }
            return (
                what,
                format!("{} outcome(s) as expected", results.len()),
                true,
            );
        }
        let command = guest_command(spec);
        let repeat = spec.repeat.unwrap_or(1);
        for _ in 0..repeat {
            if link.commands.send(command).is_err() {
                return (what, "the vCPU is gone".into(), false);
            }
        }
        if spec.is_async == Some(true) {
            link.pending
                .extend((0..repeat).map(|_| (number, expect.to_string(), spec.kind.clone())));
            return (what, format!("started {repeat} command(s)"), true);
        }
        let expected_value = matches!(spec.kind.as_str(), "read" | "dma-checksum")
            .then(|| spec.value.map(|v| v.0))
            .flatten();
        let mut last = String::new();
        for _ in 0..repeat {
            let Some(o) = recv(link, &self.stop) else {
                return (what, "stopped before the guest answered".into(), false);
            };
            let (kind, detail) = classify(&o, &spec.kind, expected_value);
            if !meets(expect, kind) {
                return (what, format!("{kind}: {detail}"), false);
            }
            last = if kind == "ok" {
                "ok".into()
            } else {
                format!("{kind}: {detail}")
            };
        }
        (what, last, true)
    }
}

impl Driver {
    /// `pin` / `unpin` steps: the driver holds named pins until `unpin` or
    /// the end of the scenario.
    fn pin_step(&mut self, spec: &StepSpec) -> (&'static str, String) {
        let name = spec.name.clone().unwrap_or_default();
        if spec.kind == "unpin" {
            return match self.held.remove(&name) {
                Some(pin) => {
                    let revoked = pin.is_revoked();
                    drop(pin);
                    let now = self.pins.account().pinned().charged();
                    let how = if revoked {
                        "was revoked earlier"
                    } else {
                        "unpinned"
                    };
                    ("ok", format!("pin {name:?} {how}; {now} pages pinned now"))
                }
                None => ("no-such-pin", format!("no pin named {name:?}")),
            };
        }
        let gpa = Gpa(spec.gpa.map_or(0, |n| n.0));
        let len = spec.size.map_or(0, |n| n.0);
        let revocable = spec.revocable.unwrap_or(true);
        match self
            .pins
            .pin(gpa, len, spec.write.unwrap_or(true), revocable)
        {
            Ok(pin) => {
                let id = pin.id();
                self.held.insert(name.clone(), pin);
                let now = self.pins.account().pinned().charged();
                let kind = if revocable {
                    "revocable"
                } else {
                    "non-revocable"
                };
                (
                    "ok",
                    format!("pin {name:?} (#{id}, {kind}); {now} pages pinned now"),
                )
            }
            Err(e) => (pin_kind(&e), e.to_string()),
        }
    }
}

fn recv(link: &VcpuLink, stop: &AtomicBool) -> Option<CommandOutcome> {
    loop {
        match link.outcomes.recv_timeout(POLL) {
            Ok(o) => return Some(o),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn range(spec: &StepSpec) -> GpaRange {
    let gpa = Gpa(spec.gpa.map_or(0, |n| n.0));
    GpaRange::new(gpa, spec.size.map_or(0, |n| n.0))
        .unwrap_or_else(|| GpaRange::new(gpa, 0).expect("empty range"))
}

fn guest_command(spec: &StepSpec) -> Command {
    use guest_image::protocol::dma_op;
    let r = range(spec);
    let num = |v: Option<super::file::Num>| v.map_or(0, |n| n.0);
    match spec.kind.as_str() {
        "fill" => Command::fill_from(r, num(spec.seed), num(spec.origin)),
        "verify" => Command::verify_from(r, num(spec.seed), num(spec.origin)),
        "verify-const" => Command::verify_const(r, num(spec.value)),
        "touch" => Command::touch(
            r,
            spec.stride.map_or(PAGE_SIZE, |n| n.0),
            spec.write.unwrap_or(false),
        ),
        "read" => Command::read(num(spec.gpa)),
        "dma-copy" => Command::dma(dma_op::COPY, num(spec.gpa), num(spec.to), r.len(), 0),
        "dma-fill" => Command::dma(dma_op::FILL, 0, num(spec.gpa), r.len(), num(spec.value)),
        "dma-checksum" => Command::dma(dma_op::CHECKSUM, num(spec.gpa), 0, r.len(), 0),
        "write" => Command::write(num(spec.gpa), num(spec.value)),
        _ => Command::spin(num(spec.iterations).max(1)),
    }
}

/// A step in words, e.g. `unplug [0x100000000, 0x100200000)`.
pub fn describe(spec: &StepSpec) -> String {
    let r = range(spec);
    let vcpu = spec.vcpu.unwrap_or(0);
    let repeat = spec
        .repeat
        .filter(|&n| n > 1)
        .map(|n| format!(" x{n}"))
        .unwrap_or_default();
    let asynchronous = if spec.is_async == Some(true) {
        " (async)"
    } else {
        ""
    };
    match spec.kind.as_str() {
        "move" => format!("move {r} to {:#x}", spec.to.map_or(0, |n| n.0)),
        "dma-copy" => format!(
            "vCPU {vcpu}: DMA copy {r} to {:#x}{repeat}{asynchronous}",
            spec.to.map_or(0, |n| n.0)
        ),
        "pin" => format!(
            "pin {:?} {r} ({})",
            spec.name.as_deref().unwrap_or(""),
            if spec.revocable == Some(false) {
                "non-revocable"
            } else {
                "revocable"
            }
        ),
        "unpin" => format!("unpin {:?}", spec.name.as_deref().unwrap_or("")),
        "resize" => format!(
            "resize slot at {} to {:#x}",
            r.start(),
            spec.new_size.map_or(0, |n| n.0)
        ),
        "protect" => format!("protect {r} {}", spec.access.as_deref().unwrap_or("?")),
        "dirty-log" => format!(
            "dirty-log {r} {}",
            if spec.on == Some(true) { "on" } else { "off" }
        ),
        "plug-many" => match spec.count {
            Some(n) => format!("plug {} slots from {}", n.0, r.start()),
            None => format!("plug slots from {} until the budget is full", r.start()),
        },
        "check" => "check KVM memslots against the map".into(),
        "stage2-dump" if spec.gpa.is_none() => "dump the IOMMU's stage-2 table".into(),
        "stage2-dump" => format!("dump the IOMMU's stage-2 table in {r}"),
        "sleep" => format!("sleep {}", spec.duration.as_deref().unwrap_or("?")),
        "wait" => format!("vCPU {vcpu}: wait for its async commands"),
        "read" | "write" => format!(
            "vCPU {vcpu}: {} {}{repeat}{asynchronous}",
            spec.kind,
            r.start()
        ),
        "spin" => format!(
            "vCPU {vcpu}: spin {}{repeat}{asynchronous}",
            spec.iterations.map_or(0, |n| n.0)
        ),
        k if spec.is_guest() => format!("vCPU {vcpu}: {k} {r}{repeat}{asynchronous}"),
        k => format!("{k} {r}"),
    }
}
