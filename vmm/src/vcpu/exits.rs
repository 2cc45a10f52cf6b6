//! What the vCPU loop does with each `KVM_RUN` exit: [`ExitHandler`] keeps
//! the loop's state (the command in flight, console text, the report) and
//! maps every exit to a [`VcpuEmulation`].

use std::collections::BTreeMap;
use std::time::Instant;

use guest_image::protocol::{
    command, status, MMIO_BASE, MMIO_SIZE, REG_CONSOLE, REG_DMA_SUBMIT, REG_DOORBELL, REG_EXCEPTION,
};
use kvm_ioctls::VcpuExit;

use super::console::LineBuffer;
use super::context::VcpuContext;
use super::mailbox::Mailbox;
use super::mmio;
use super::report::{CommandReport, VcpuReport};
use crate::failure::GuestFailure;
use crate::plan::{Command, CommandOutcome, Step};
use crate::units::fmt_duration;

/// What became of one exit (or one attempt to enter the guest).
#[derive(Debug)]
pub(super) enum VcpuEmulation {
    /// Handled; enter the guest again.
    Handled,
    /// The guest stopped as the plan told it to: the vCPU's run succeeded.
    Finished,
    /// The guest, KVM or a stop request ended the command or the run.
    Failed(GuestFailure),
}

/// A command posted to the guest and not yet answered.
#[derive(Debug)]
struct InFlight {
    command: Command,
    started: Instant,
}

/// The vCPU loop's state between exits.
#[derive(Debug)]
pub(super) struct ExitHandler {
    pub(super) ctx: VcpuContext,
    mailbox: Mailbox,
    report: VcpuReport,
    in_flight: Option<InFlight>,
    stop_posted: bool,
    console: LineBuffer,
}

impl ExitHandler {
    pub(super) fn new(ctx: VcpuContext) -> Self {
        let index = ctx.index;
        Self {
            mailbox: Mailbox::new(ctx.boot.clone(), index),
            report: VcpuReport {
                index,
                failure: None,
                commands: Vec::new(),
                exits: BTreeMap::new(),
            },
            ctx,
            in_flight: None,
            stop_posted: false,
            console: LineBuffer::default(),
        }
    }

    fn vcpu(&self) -> u64 {
        self.ctx.index
    }

    /// Counts one exit (or interruption) under `reason`.
    pub(super) fn count(&mut self, reason: &'static str) {
        *self.report.exits.entry(reason).or_default() += 1;
    }

    /// Handles `exit` and counts it.
    pub(super) fn on_exit(&mut self, exit: VcpuExit<'_>) -> VcpuEmulation {
        let (reason, outcome) = self.dispatch(exit);
        self.count(reason);
        outcome
    }

    fn dispatch(&mut self, exit: VcpuExit<'_>) -> (&'static str, VcpuEmulation) {
        let vcpu = self.vcpu();
        let unexpected =
            |what: String| VcpuEmulation::Failed(GuestFailure::UnexpectedExit { vcpu, what });
        match exit {
            VcpuExit::MmioWrite(REG_DOORBELL, data) => {
                ("mmio_doorbell", self.on_doorbell(word(data)))
            }
            VcpuExit::MmioWrite(REG_DMA_SUBMIT, data) => {
                ("mmio_dma", self.on_dma_submit(word(data)))
            }
            VcpuExit::MmioWrite(REG_CONSOLE, data) => ("mmio_console", self.on_console(word(data))),
            VcpuExit::MmioWrite(REG_EXCEPTION, _) => {
                let record = self.mailbox.exception();
                let failure = GuestFailure::exception(vcpu, &record);
                ("mmio_exception", VcpuEmulation::Failed(failure))
            }
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => (
                "io",
                unexpected(format!(
                    "port I/O to port {port:#x} (the protocol uses MMIO registers)"
                )),
            ),
            VcpuExit::MmioRead(gpa, _) | VcpuExit::MmioWrite(gpa, _)
                if (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&gpa) =>
            {
                (
                    "mmio_register",
                    unexpected(format!("access to unknown VMM register {gpa:#x}")),
                )
            }
            VcpuExit::MmioRead(gpa, data) => self.on_memory_access(gpa, data, false),
            VcpuExit::MmioWrite(gpa, data) => {
                let mut buf = [0u8; 8];
                let n = data.len().min(8);
                buf[..n].copy_from_slice(&data[..n]);
                self.on_memory_access(gpa, &mut buf[..n], true)
            }
            VcpuExit::Intr => ("intr", VcpuEmulation::Handled),
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                ("dirty_ring_full", self.on_dirty_ring_full())
            }
            VcpuExit::Shutdown => (
                "shutdown",
                VcpuEmulation::Failed(GuestFailure::Shutdown { vcpu }),
            ),
            other => ("other", unexpected(format!("{other:?}"))),
        }
    }

    /// `KVM_EXIT_DIRTY_RING_FULL`: this vCPU's ring reached its soft limit
    /// and KVM will not enter the guest until it is harvested and reset.
    /// Every ring is harvested into the manager's pending pages (nothing is
    /// lost: the reserve held the writes in flight), then the guest resumes.
    fn on_dirty_ring_full(&self) -> VcpuEmulation {
        match self.ctx.memory.harvest_dirty_rings() {
            Ok(_) => VcpuEmulation::Handled,
            Err(e) => VcpuEmulation::Failed(GuestFailure::UnexpectedExit {
                vcpu: self.vcpu(),
                what: format!("KVM_EXIT_DIRTY_RING_FULL, and harvesting failed: {e}"),
            }),
        }
    }

    /// A guest access outside the register page (see [`mmio`]).
    fn on_memory_access(
        &self,
        gpa: u64,
        data: &mut [u8],
        write: bool,
    ) -> (&'static str, VcpuEmulation) {
        let vcpu = self.vcpu();
        let size = data.len();
        match mmio::emulate(&self.ctx.memory, gpa, data, write) {
            mmio::Access::Emulated => ("mmio_emulated", VcpuEmulation::Handled),
            mmio::Access::Unplugged => (
                "mmio_unplugged",
                VcpuEmulation::Failed(GuestFailure::UnpluggedAccess {
                    vcpu,
                    gpa,
                    kind: if write { "write" } else { "read" },
                    size,
                }),
            ),
            mmio::Access::ReadOnly => (
                "mmio_read_only",
                VcpuEmulation::Failed(GuestFailure::ReadOnlyWrite { vcpu, gpa, size }),
            ),
        }
    }

    /// The guest wrote `len` bytes of console text to its mailbox.
    fn on_console(&mut self, len: u32) -> VcpuEmulation {
        let text = self.mailbox.console(len as usize);
        self.console.push(&text, self.ctx.index, &self.ctx.console);
        VcpuEmulation::Handled
    }

    /// The guest submitted the DMA descriptor at `descriptor`; it must be
    /// its own (in its mailbox): anything else would leave it polling forever.
    fn on_dma_submit(&mut self, descriptor: u32) -> VcpuEmulation {
        let own = self.mailbox.dma_descriptor();
        let what = match &self.ctx.dma {
            Some(dma) if u64::from(descriptor) == own => {
                dma.submit(own);
                return VcpuEmulation::Handled;
            }
            Some(_) => format!(
                "DMA descriptor submitted at {descriptor:#x}; it must be the vCPU's own, at {own:#x}"
            ),
            None => "DMA submitted but this VM has no DMA engine".into(),
        };
        VcpuEmulation::Failed(GuestFailure::UnexpectedExit {
            vcpu: self.vcpu(),
            what,
        })
    }

    /// The guest rang with status `st`: records the finished command, posts
    /// the next one.
    fn on_doorbell(&mut self, st: u32) -> VcpuEmulation {
        if st == status::STOPPED {
            return self.on_guest_stopped();
        }
        match self.in_flight.take() {
            Some(flight) => {
                if let Some(failure) = self.complete(flight, st) {
                    return VcpuEmulation::Failed(failure);
                }
            }
            None if st != status::READY => {
                return VcpuEmulation::Failed(GuestFailure::UnexpectedExit {
                    vcpu: self.vcpu(),
                    what: format!("doorbell with status {st:#x} before any command"),
                })
            }
            None => {}
        }
        self.post_next()
    }

    /// Success only in answer to a STOP the VMM posted.
    fn on_guest_stopped(&self) -> VcpuEmulation {
        if self.stop_posted && self.in_flight.is_none() {
            VcpuEmulation::Finished
        } else {
            VcpuEmulation::Failed(GuestFailure::UnexpectedExit {
                vcpu: self.vcpu(),
                what: "the guest reported STOPPED without being told to stop".into(),
            })
        }
    }

    /// Records `flight`, ended with status `st`, and tells the plan. Returns
    /// the failure that ends the run, if it failed and the plan cannot recover.
    fn complete(&mut self, flight: InFlight, st: u32) -> Option<GuestFailure> {
        let results = self.mailbox.results();
        let elapsed = flight.started.elapsed();
        let cmd = flight.command;
        self.report.commands.push(CommandReport {
            command: cmd.describe(),
            status: st,
            results,
            micros: elapsed.as_micros() as u64,
        });
        match self.command_failure(&cmd, st, results) {
            Some(f) if self.ctx.plan.recoverable() => {
                self.ctx.plan.completed(&CommandOutcome::Failed(f))
            }
            Some(f) => return Some(f),
            None => self.ctx.plan.completed(&CommandOutcome::Done { results }),
        }
        if self.ctx.progress && cmd.code != command::HELLO {
            let text = format!("{} ok in {}", cmd.describe(), fmt_duration(elapsed));
            self.ctx.console.send(self.ctx.index, text, true);
        }
        None
    }

    /// The failure a command's status `st` means, if any.
    fn command_failure(&self, cmd: &Command, st: u32, results: [u64; 6]) -> Option<GuestFailure> {
        let vcpu = self.vcpu();
        let is_verify = cmd.code == command::VERIFY || cmd.code == command::VERIFY_CONST;
        if st == status::MISMATCH && is_verify {
            Some(GuestFailure::VerifyMismatch {
                vcpu,
                gpa: results[0],
                expected: results[1],
                actual: results[2],
            })
        } else if st != status::OK {
            Some(GuestFailure::CommandFailed {
                vcpu,
                command: cmd.describe(),
                status: st,
            })
        } else {
            None
        }
    }

    /// Posts the plan's next step.
    fn post_next(&mut self) -> VcpuEmulation {
        match self.ctx.plan.next() {
            Ok(Step::Run(command)) => {
                self.mailbox.post(&command);
                self.in_flight = Some(InFlight {
                    command,
                    started: Instant::now(),
                });
            }
            Ok(Step::Stop) => {
                self.mailbox.post(&Command::new(command::STOP, [0; 6]));
                self.stop_posted = true;
            }
            Err(_) => return VcpuEmulation::Failed(GuestFailure::Stopped { vcpu: self.vcpu() }),
        }
        VcpuEmulation::Handled
    }

    /// Whether `failure` ends only the command in flight: a guest fault under
    /// a recoverable plan. Recoverable only while a command is in flight: a
    /// fault outside one (before READY, after STOP) has no step to report to
    /// and would otherwise repeat after every reset.
    pub(super) fn can_recover(&self, failure: &GuestFailure) -> bool {
        failure.is_guest_fault() && self.ctx.plan.recoverable() && self.in_flight.is_some()
    }

    /// Ends the command in flight with `failure` and tells the plan.
    pub(super) fn abort_command(&mut self, failure: GuestFailure) {
        if let Some(flight) = self.in_flight.take() {
            self.report.commands.push(CommandReport {
                command: flight.command.describe(),
                status: u32::MAX,
                results: [0; 6],
                micros: flight.started.elapsed().as_micros() as u64,
            });
        }
        self.ctx.plan.completed(&CommandOutcome::Failed(failure));
    }

    /// Flushes the console and returns the report, ended by `failure`.
    pub(super) fn finish(mut self, failure: Option<GuestFailure>) -> VcpuReport {
        self.console.flush(self.ctx.index, &self.ctx.console);
        self.report.failure = failure;
        self.report
    }
}

/// The first 4 bytes of an MMIO store, as a little-endian word (zero-padded).
fn word(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_pads_short_stores_with_zeros() {
        assert_eq!(word(&[0x34, 0x12]), 0x1234);
        assert_eq!(word(&[1, 0, 0, 0, 0xFF, 0xFF]), 1);
        assert_eq!(word(&[]), 0);
    }
}
