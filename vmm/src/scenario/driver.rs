//! Runs a scenario's timeline on its own thread while the vCPUs run: memory
//! ops go to the KVM applier, guest steps go to the vCPUs' [`ChannelPlan`]s,
//! and every step's outcome is checked against its expectation.
//!
//! A guest step reaches its vCPU as one [`Batch`] (the command and how many
//! times to run it), and its result comes back as one [`BatchOutcome`]: the
//! work queued per step is constant whatever its `repeat`.
//!
//! The first step whose expectation fails ends the scenario: later steps are
//! not run. Closing the command channels then ends the guests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::devices::iommu::Iommu;
use crate::devices::pins::{Pin, PinError, PinManager};
use crate::kvm::memslots::MemslotApplier;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::BackingKind;
use crate::plan::{Aborted, Command, CommandOutcome, Step, VcpuPlan};
use crate::vcpu::{fmt_duration, GuestFailure};

use super::expect::{Expect, Outcome};
use super::file::Scenario;
use super::step::{self, Action, Guest};

const POLL: Duration = Duration::from_millis(20);

/// How a guest command's results are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// `results[0]` must equal the value, if one is given (`read`).
    Plain(Option<u64>),
    /// A DMA: `results[0]` is the engine's status, `results[1]` the checksum,
    /// which must equal the value if one is given.
    Dma(Option<u64>),
}

/// One guest step for a vCPU: run `command` `count` times, judging each
/// outcome; stop at the first the expectation does not accept.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The command.
    pub command: Command,
    /// How many times.
    pub count: u64,
    /// How its results are judged.
    pub judge: Judge,
    /// What each outcome must be.
    pub expect: Expect,
}

/// What a [`Batch`] did.
#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// Commands run.
    pub ran: u64,
    /// The last outcome, with detail (the one not accepted, if any).
    pub last: (Outcome, String),
    /// Whether every outcome was accepted.
    pub met: bool,
}

/// A vCPU's plan under a scenario: batches arrive on a channel, their
/// outcomes go back on another, and guest faults end only the command.
#[derive(Debug)]
pub struct ChannelPlan {
    batches: Receiver<Batch>,
    outcomes: Sender<BatchOutcome>,
    stop: Arc<AtomicBool>,
    current: Option<(Batch, u64)>,
}

impl VcpuPlan for ChannelPlan {
    fn next(&mut self) -> Result<Step, Aborted> {
        loop {
            if let Some((batch, _)) = &self.current {
                if self.stop.load(Ordering::Acquire) {
                    return Err(Aborted);
                }
                return Ok(Step::Run(batch.command));
            }
            match self.batches.recv_timeout(POLL) {
                Ok(b) if b.count == 0 => {
                    let _ = self.outcomes.send(BatchOutcome {
                        ran: 0,
                        last: (Outcome::Ok, "nothing to run".into()),
                        met: true,
                    });
                }
                Ok(b) => self.current = Some((b, 0)),
                Err(RecvTimeoutError::Disconnected) => return Ok(Step::Stop),
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::Acquire) => {
                    return Err(Aborted)
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
    fn completed(&mut self, outcome: &CommandOutcome) {
        let Some((batch, ran)) = &mut self.current else {
            return;
        };
        *ran += 1;
        let last = classify(outcome, batch.judge);
        let met = batch.expect.accepts(last.0);
        if !met || *ran == batch.count {
            let ran = *ran;
            self.current = None;
            let _ = self.outcomes.send(BatchOutcome { ran, last, met });
        }
    }
    fn recoverable(&self) -> bool {
        true
    }
}

/// The driver's end of one vCPU's channels.
#[derive(Debug)]
pub struct VcpuLink {
    batches: Sender<Batch>,
    outcomes: Receiver<BatchOutcome>,
    /// The step whose async batch is not yet collected.
    pending: Option<usize>,
}

/// Creates the plan for a vCPU and the driver's link to it.
pub fn channel_pair(stop: Arc<AtomicBool>) -> (ChannelPlan, VcpuLink) {
    let (btx, brx) = mpsc::channel();
    let (otx, orx) = mpsc::channel();
    (
        ChannelPlan {
            batches: brx,
            outcomes: otx,
            stop,
            current: None,
        },
        VcpuLink {
            batches: btx,
            outcomes: orx,
            pending: None,
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

/// A guest command's outcome and its detail.
fn classify(outcome: &CommandOutcome, judge: Judge) -> (Outcome, String) {
    use guest_image::protocol::dma_status;
    match (outcome, judge) {
        (CommandOutcome::Done { results }, Judge::Dma(want)) => match results[0] {
            dma_status::DONE => match want {
                Some(v) if results[1] != v => (
                    Outcome::Mismatch,
                    format!("checksum {:#x}, expected {v:#x}", results[1]),
                ),
                _ => (
                    Outcome::Ok,
                    format!("DMA done (checksum {:#x})", results[1]),
                ),
            },
            dma_status::FAULT => (
                Outcome::DmaFault,
                "DMA fault: memory not plugged or not writable".into(),
            ),
            dma_status::NO_PIN => (
                Outcome::DmaNoPin,
                "DMA refused: the pin limit would be exceeded".into(),
            ),
            dma_status::REVOKED => (
                Outcome::DmaRevoked,
                "DMA stopped: memory changed under it".into(),
            ),
            s => (Outcome::DmaInvalid, format!("DMA invalid (status {s})")),
        },
        (CommandOutcome::Done { results }, Judge::Plain(want)) => match want {
            Some(v) if results[0] != v => (
                Outcome::Mismatch,
                format!("read {:#x}, expected {v:#x}", results[0]),
            ),
            _ => (Outcome::Ok, "ok".into()),
        },
        (CommandOutcome::Failed(f), _) => {
            let kind = match f {
                GuestFailure::VerifyMismatch { .. } => Outcome::Mismatch,
                GuestFailure::UnpluggedAccess { .. } => Outcome::Unplugged,
                GuestFailure::ReadOnlyWrite { .. } => Outcome::ReadOnly,
                GuestFailure::Exception { .. } => Outcome::Exception,
                _ => Outcome::CommandFailed,
            };
            (kind, f.to_string())
        }
    }
}

fn pin_kind(e: &PinError) -> Outcome {
    match e {
        PinError::BadRange { .. } => Outcome::BadRange,
        PinError::NotPlugged { .. } => Outcome::NotPlugged,
        PinError::ReadOnly { .. } => Outcome::ReadOnly,
        PinError::Limit { .. } => Outcome::PinLimit,
        PinError::Mlock { .. } => Outcome::Mlock,
        PinError::Busy { .. } => Outcome::Busy,
    }
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
        let mut steps = Vec::new();
        for (i, spec) in scenario.steps.iter().enumerate() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let started = Instant::now();
            let (what, actual, passed) = self.step(i + 1, spec);
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
        ScenarioReport {
            name: scenario.title().to_string(),
            passed: not_run == 0 && steps.iter().all(|s| s.passed),
            steps,
            not_run,
        }
        // Dropping `self.links` closes the command channels: the guests stop.
    }

    fn step(&mut self, number: usize, spec: &step::Step) -> (String, String, bool) {
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
            Action::Wait(w) => return self.wait(what, w.vcpu),
            _ => {}
        }
        let Some((command, judge)) = guest_command(&spec.action) else {
            return match super::ops::run_op(&self.memory, &self.iommu, &spec.action, &self.backing)
            {
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

    /// `wait`: collects the vCPU's async batch, if it has one.
    fn wait(&mut self, what: String, vcpu: u64) -> (String, String, bool) {
        let vcpus = self.links.len();
        let Some(link) = self.links.get_mut(vcpu as usize) else {
            return (what, format!("no vCPU {vcpu} (the VM has {vcpus})"), false);
        };
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
    fn pin(&mut self, p: &step::Pin) -> (Outcome, String) {
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
            Err(e) => (pin_kind(&e), e.to_string()),
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

fn recv(link: &VcpuLink, stop: &AtomicBool) -> Option<BatchOutcome> {
    loop {
        match link.outcomes.recv_timeout(POLL) {
            Ok(o) => return Some(o),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn range(gpa: u64, size: u64) -> GpaRange {
    GpaRange::new(Gpa(gpa), size)
        .unwrap_or_else(|| GpaRange::new(Gpa(gpa), 0).expect("empty range"))
}

/// The mailbox command of a guest step, and how to judge its results.
pub fn guest_command(action: &Action) -> Option<(Command, Judge)> {
    use guest_image::protocol::dma_op;
    let plain = Judge::Plain(None);
    Some(match action {
        Action::Fill(Guest { command: c, .. }) => (
            Command::fill_from(
                range(c.gpa.0, c.size.0),
                c.seed.0,
                c.origin.map_or(0, |n| n.0),
            ),
            plain,
        ),
        Action::Verify(Guest { command: c, .. }) => (
            Command::verify_from(
                range(c.gpa.0, c.size.0),
                c.seed.0,
                c.origin.map_or(0, |n| n.0),
            ),
            plain,
        ),
        Action::VerifyConst(Guest { command: c, .. }) => (
            Command::verify_const(range(c.gpa.0, c.size.0), c.value.0),
            plain,
        ),
        Action::Touch(Guest { command: c, .. }) => (
            Command::touch(
                range(c.gpa.0, c.size.0),
                c.stride.map_or(PAGE_SIZE, |n| n.0),
                c.write.unwrap_or(false),
            ),
            plain,
        ),
        Action::Read(Guest { command: c, .. }) => {
            (Command::read(c.gpa.0), Judge::Plain(c.value.map(|n| n.0)))
        }
        Action::Write(Guest { command: c, .. }) => (Command::write(c.gpa.0, c.value.0), plain),
        Action::Spin(Guest { command: c, .. }) => (Command::spin(c.iterations.0.max(1)), plain),
        Action::DmaCopy(Guest { command: c, .. }) => (
            Command::dma(dma_op::COPY, c.gpa.0, c.to.0, c.size.0, 0),
            Judge::Dma(None),
        ),
        Action::DmaFill(Guest { command: c, .. }) => (
            Command::dma(dma_op::FILL, 0, c.gpa.0, c.size.0, c.value.0),
            Judge::Dma(None),
        ),
        Action::DmaChecksum(Guest { command: c, .. }) => (
            Command::dma(dma_op::CHECKSUM, c.gpa.0, 0, c.size.0, 0),
            Judge::Dma(c.value.map(|n| n.0)),
        ),
        _ => return None,
    })
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
        Action::Wait(w) => format!("vCPU {}: wait for its async commands", w.vcpu),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(count: u64, expect: &str) -> Batch {
        Batch {
            command: Command::read(0x4000_0000),
            count,
            judge: Judge::Plain(Some(7)),
            expect: expect.parse().unwrap(),
        }
    }

    fn read(value: u64) -> CommandOutcome {
        CommandOutcome::Done {
            results: [value, 0, 0, 0, 0, 0],
        }
    }

    #[test]
    fn test_a_huge_repeat_is_one_message_not_a_queue() {
        let (mut plan, link) = channel_pair(Arc::new(AtomicBool::new(false)));
        link.batches.send(batch(1_000_000_000_000, "ok")).unwrap();
        for _ in 0..10_000 {
            assert_eq!(plan.next(), Ok(Step::Run(Command::read(0x4000_0000))));
            plan.completed(&read(7));
        }
        // Nothing else was queued: the plan repeats the one command itself.
        assert!(link.outcomes.try_recv().is_err());
        assert!(plan.batches.try_recv().is_err());
    }

    #[test]
    fn test_a_batch_reports_once_and_stops_at_the_first_unmet_outcome() {
        let (mut plan, link) = channel_pair(Arc::new(AtomicBool::new(false)));
        link.batches.send(batch(3, "ok")).unwrap();
        for _ in 0..3 {
            assert!(matches!(plan.next(), Ok(Step::Run(_))));
            plan.completed(&read(7));
        }
        let o = link.outcomes.try_recv().unwrap();
        assert_eq!((o.ran, o.met, o.last.0), (3, true, Outcome::Ok));

        link.batches.send(batch(100, "ok")).unwrap();
        assert!(matches!(plan.next(), Ok(Step::Run(_))));
        plan.completed(&read(7));
        assert!(matches!(plan.next(), Ok(Step::Run(_))));
        plan.completed(&read(8));
        let o = link.outcomes.try_recv().unwrap();
        assert_eq!((o.ran, o.met, o.last.0), (2, false, Outcome::Mismatch));
        assert!(o.last.1.contains("read 0x8, expected 0x7"), "{}", o.last.1);

        // A read of another value is what `expect = "mismatch"` accepts.
        link.batches.send(batch(1, "mismatch")).unwrap();
        assert!(matches!(plan.next(), Ok(Step::Run(_))));
        plan.completed(&read(9));
        assert!(link.outcomes.try_recv().unwrap().met);
        drop(link);
        assert_eq!(plan.next(), Ok(Step::Stop));
    }
}
