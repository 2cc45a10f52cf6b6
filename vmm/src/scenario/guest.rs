//! The vCPU side of a scenario: a guest step reaches its vCPU as one
//! [`Batch`] (the command and how many times to run it), the vCPU's
//! [`ChannelPlan`] repeats and judges it, and the result comes back as one
//! [`BatchOutcome`]. The work queued per step is constant whatever its
//! `repeat`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::failure::GuestFailure;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::plan::{Aborted, Command, CommandOutcome, Step, VcpuPlan};

use super::expect::{Expect, Outcome};
use super::step::{Action, Guest};

pub(super) const POLL: Duration = Duration::from_millis(20);

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

/// How far a vCPU's batch got, as its plan counts it: what a `wait` with
/// `completed` waits on while the batch runs on.
///
/// The driver resets it before it sends a batch ([`Progress::start`]); the
/// plan counts every finished command and marks the batch's end before it
/// sends the [`BatchOutcome`]. A vCPU has one batch at a time (the file
/// reader wants a `wait` between an async step and the vCPU's next
/// command), so a reset never meets a batch still counting.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<Counted>,
    changed: Condvar,
}

/// What [`Progress`] guards: where the batch is, and whether a `wait` is
/// waiting on it (only then does a finished command wake anyone: the plan
/// counts every command, and a wake is a system call).
#[derive(Debug, Default)]
struct Counted {
    ran: Ran,
    waiting: bool,
}

/// Commands a batch has finished, and whether it has ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// Commands finished (whatever their outcome).
    pub commands: u64,
    /// The batch ended: every command ran, or one's outcome was refused.
    pub ended: bool,
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new batch: nothing finished yet.
    pub fn start(&self) {
        self.lock().ran = Ran::default();
    }

    fn set(&self, ran: Ran) {
        let mut state = self.lock();
        state.ran = ran;
        if state.waiting {
            self.changed.notify_all();
        }
    }

    /// Waits until at least `k` commands have finished or the batch ended,
    /// `deadline` passed (`None`: no deadline) or `stop` is set; returns
    /// where the batch was then.
    pub fn wait_for(&self, k: u64, deadline: Option<Instant>, stop: &AtomicBool) -> Ran {
        let mut state = self.lock();
        let ran = loop {
            let ran = state.ran;
            if ran.commands >= k || ran.ended || stop.load(Ordering::Acquire) {
                break ran;
            }
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(POLL),
                    _ => break ran,
                },
                None => POLL,
            };
            state.waiting = true;
            // In slices, so a stop is seen promptly.
            state = self
                .changed
                .wait_timeout(state, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        state.waiting = false;
        ran
    }
}

/// A vCPU's plan under a scenario: batches arrive on a channel, their
/// outcomes go back on another, and guest faults end only the command.
#[derive(Debug)]
pub struct ChannelPlan {
    batches: Receiver<Batch>,
    outcomes: Sender<BatchOutcome>,
    stop: Arc<AtomicBool>,
    current: Option<(Batch, u64)>,
    progress: Arc<Progress>,
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
                    self.progress.set(Ran {
                        commands: 0,
                        ended: true,
                    });
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
        let ended = !met || *ran == batch.count;
        self.progress.set(Ran {
            commands: *ran,
            ended,
        });
        if ended {
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
    pub(super) batches: Sender<Batch>,
    pub(super) outcomes: Receiver<BatchOutcome>,
    /// The step whose async batch is not yet collected.
    pub(super) pending: Option<usize>,
    /// How far the current batch got.
    pub(super) progress: Arc<Progress>,
}

/// Creates the plan for a vCPU and the driver's link to it.
pub fn channel_pair(stop: Arc<AtomicBool>) -> (ChannelPlan, VcpuLink) {
    let (btx, brx) = mpsc::channel();
    let (otx, orx) = mpsc::channel();
    let progress = Arc::new(Progress::default());
    (
        ChannelPlan {
            batches: brx,
            outcomes: otx,
            stop,
            current: None,
            progress: progress.clone(),
        },
        VcpuLink {
            batches: btx,
            outcomes: orx,
            pending: None,
            progress,
        },
    )
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

pub(super) fn recv(link: &VcpuLink, stop: &AtomicBool) -> Option<BatchOutcome> {
    loop {
        match link.outcomes.recv_timeout(POLL) {
            Ok(o) => return Some(o),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

pub(super) fn range(gpa: u64, size: u64) -> GpaRange {
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
