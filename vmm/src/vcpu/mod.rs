//! A vCPU thread: runs `KVM_RUN`, answers the guest's doorbell (an MMIO store) with the next
//! command of its plan, forwards console text, and turns every other exit into
//! a clear [`GuestFailure`].
//!
//! The loop ([`run_vcpu`]) keeps its state between exits in an exit handler
//! (`exits.rs`) that maps each exit to a `VcpuEmulation`: handled, finished
//! (the guest stopped as told) or failed. The mailbox and the console have
//! their own modules.
//!
//! The loop never reads guest registers: everything the guest reports travels
//! through its mailbox page (a vCPU ioctl costs ~6 µs on this host).
//!
//! Guest memory accesses that exit as MMIO are handled in [`mmio`].
//!
//! Recovery: a plan can make guest failures recoverable ([`VcpuPlan::recoverable`](crate::plan::VcpuPlan::recoverable),
//! used by scenarios). Then a failure ends only the current command: the
//! vCPU completes the pending exit (`immediate_exit`), resets the guest to its
//! command loop (registers as at boot) and reports the failure to the plan.
//!
//! Stopping: another thread sets the shared stop flag and sends
//! [`kick_signal`] (SIGRTMIN) to the thread until it returns; the signal makes
//! `KVM_RUN` fail with EINTR, and the loop checks the flag before every entry.
//! Its no-op handler is registered with vmm-sys-util, as rust-vmm VMMs do: it
//! must only interrupt, and signal-hook (used for SIGINT/SIGTERM in `run`)
//! adds nothing to a handler that does nothing.

use std::fmt;
use std::sync::atomic::Ordering;

use kvm_ioctls::VcpuFd;

mod console;
mod context;
mod exits;
mod mailbox;
pub mod mmio;
mod report;

pub use console::{ConsoleLine, ConsoleSender, ConsoleSink};
pub use context::VcpuContext;
use exits::{ExitHandler, VcpuEmulation};
pub use report::{CommandReport, VcpuReport};

use crate::failure::GuestFailure;

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
}

/// Runs vCPU `ctx.index` until its plan ends or it fails; never panics on guest behaviour.
pub fn run_vcpu(vcpu: VcpuFd, ctx: VcpuContext) -> VcpuReport {
    VcpuLoop {
        fd: vcpu,
        exits: ExitHandler::new(ctx),
    }
    .run()
}

/// A vCPU fd and the state its exits act on.
struct VcpuLoop {
    fd: VcpuFd,
    exits: ExitHandler,
}

impl VcpuLoop {
    fn run(mut self) -> VcpuReport {
        let failure = loop {
            match self.enter_guest() {
                VcpuEmulation::Handled => {}
                VcpuEmulation::Finished => break None,
                VcpuEmulation::Failed(f) if self.exits.can_recover(&f) => {
                    self.exits.abort_command(f);
                    if let Err(e) = self.reset_guest() {
                        break Some(e);
                    }
                }
                VcpuEmulation::Failed(f) => break Some(f),
            }
        };
        self.exits.finish(failure)
    }

    fn index(&self) -> u64 {
        self.exits.ctx.index
    }

    /// Runs the guest until its next exit and handles it; checks the stop
    /// flag first.
    fn enter_guest(&mut self) -> VcpuEmulation {
        if self.exits.ctx.stop.load(Ordering::Acquire) {
            return VcpuEmulation::Failed(GuestFailure::Stopped { vcpu: self.index() });
        }
        let vcpu = self.index();
        match self.fd.run() {
            Ok(exit) => self.exits.on_exit(exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.exits.count("intr");
                VcpuEmulation::Handled
            }
            Err(e) => {
                let hint = if e.errno() == libc::EFAULT {
                    " (a guest access hit host memory that is not mapped)"
                } else {
                    ""
                };
                VcpuEmulation::Failed(GuestFailure::Kvm {
                    vcpu,
                    error: e.to_string(),
                    hint,
                })
            }
        }
    }

    /// Completes the pending exit without running guest code, then puts the
    /// guest back at the start of its command loop.
    fn reset_guest(&mut self) -> Result<(), GuestFailure> {
        let ctx = &self.exits.ctx;
        let kvm_failure = |e: &dyn fmt::Display| GuestFailure::Kvm {
            vcpu: ctx.index,
            error: format!("resetting the guest: {e}"),
            hint: "",
        };
        complete_pending_exit(&mut self.fd).map_err(|e| kvm_failure(&e))?;
        crate::vm::setup_vcpu_registers(&self.fd, ctx.index, ctx.vcpus, ctx.entry)
            .map_err(|e| kvm_failure(&e))
    }
}

/// Completes the exit KVM has pending without running guest code. An access
/// split in fragments (e.g. crossing a page) exits once per fragment:
/// complete each one (reads get zeros) until KVM reports EINTR, i.e. nothing
/// is pending; only then may the registers be replaced.
fn complete_pending_exit(fd: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    fd.set_kvm_immediate_exit(1);
    let mut completed = Ok(());
    for _ in 0..64 {
        match fd.run() {
            Ok(kvm_ioctls::VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(kvm_ioctls::VcpuExit::MmioWrite(..)) => {}
            Ok(_) => break,
            Err(e) if e.errno() == libc::EINTR => break,
            Err(e) => {
                completed = Err(e);
                break;
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
    completed
}
