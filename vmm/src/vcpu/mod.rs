//! A vCPU thread: runs `KVM_RUN`, answers the guest's doorbell (an MMIO store) with the next
//! command of its plan, forwards console text, and turns every other exit into
//! a clear [`GuestFailure`].
//!
//! The loop never reads guest registers: everything the guest reports travels
//! through its mailbox page (a vCPU ioctl costs ~6 µs on this host).
//!
//! Guest memory accesses that exit as MMIO are handled in [`mmio`].
//!
//! Recovery: a plan can make guest failures recoverable ([`VcpuPlan::recoverable`],
//! used by scenarios). Then a failure ends only the current command: the
//! vCPU completes the pending exit (`immediate_exit`), resets the guest to its
//! command loop (registers as at boot) and reports the failure to the plan.
//!
//! Stopping: another thread sets the shared stop flag and sends
//! [`kick_signal`] (SIGRTMIN) to the thread until it returns; the signal makes `KVM_RUN` fail with EINTR,
//! and the loop checks the flag before every entry.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use guest_image::protocol::{
    command, layout, mailbox_offset, status, ExceptionRecord, MMIO_BASE, MMIO_SIZE, REG_CONSOLE,
    REG_DMA_SUBMIT, REG_DOORBELL, REG_EXCEPTION,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub mod mmio;

use crate::mm::addr::Gpa;
use crate::mm::manager::MemoryManager;
use crate::plan::{Command, CommandOutcome, Step, VcpuPlan};

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
}

/// Why a vCPU's guest program did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFailure {
    /// The guest took an exception.
    #[error("vCPU {vcpu}: guest exception {name} (vector {vector}, error code {error_code:#x}) at RIP {rip:#x}, CR2 {cr2:#x}")]
    Exception {
        /// vCPU index.
        vcpu: u64,
        /// Mnemonic (#PF...).
        name: &'static str,
        /// Vector.
        vector: u64,
        /// Error code.
        error_code: u64,
        /// Faulting RIP.
        rip: u64,
        /// CR2.
        cr2: u64,
    },
    /// VERIFY found a word that differs from the pattern.
    #[error(
        "vCPU {vcpu}: verify mismatch at {gpa:#x}: expected {expected:#018x}, found {actual:#018x}"
    )]
    VerifyMismatch {
        /// vCPU index.
        vcpu: u64,
        /// Address of the word.
        gpa: u64,
        /// Pattern value.
        expected: u64,
        /// Value found.
        actual: u64,
    },
    /// A command ended with a status other than OK.
    #[error("vCPU {vcpu}: {command} failed with guest status {status:#x}")]
    CommandFailed {
        /// vCPU index.
        vcpu: u64,
        /// The command.
        command: String,
        /// Its status.
        status: u32,
    },
    /// The guest accessed guest-physical memory that has no memslot.
    #[error(
        "vCPU {vcpu}: guest {kind} of {size} bytes at unplugged guest-physical address {gpa:#x}"
    )]
    UnpluggedAccess {
        /// vCPU index.
        vcpu: u64,
        /// Address.
        gpa: u64,
        /// "read" or "write".
        kind: &'static str,
        /// Access size.
        size: usize,
    },
    /// The guest wrote to read-only (protected) memory.
    #[error(
        "vCPU {vcpu}: guest write of {size} bytes to read-only guest-physical address {gpa:#x}"
    )]
    ReadOnlyWrite {
        /// vCPU index.
        vcpu: u64,
        /// Address.
        gpa: u64,
        /// Access size.
        size: usize,
    },
    /// Triple fault.
    #[error("vCPU {vcpu}: guest shut down (triple fault)")]
    Shutdown {
        /// vCPU index.
        vcpu: u64,
    },
    /// An exit the VMM does not expect.
    #[error("vCPU {vcpu}: unexpected exit: {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u64,
        /// Description.
        what: String,
    },
    /// KVM_RUN failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {error}{hint}")]
    Kvm {
        /// vCPU index.
        vcpu: u64,
        /// The error text.
        error: String,
        /// Explanation for known errnos.
        hint: &'static str,
    },
    /// The run was stopped from outside (timeout, signal, another vCPU failed).
    #[error("vCPU {vcpu}: stopped")]
    Stopped {
        /// vCPU index.
        vcpu: u64,
    },
}

impl GuestFailure {
    /// Whether the guest program caused it (as opposed to KVM, the VMM or a
    /// stop): only these can end just a command under a recoverable plan.
    pub fn is_guest_fault(&self) -> bool {
        matches!(
            self,
            GuestFailure::Exception { .. }
                | GuestFailure::VerifyMismatch { .. }
                | GuestFailure::CommandFailed { .. }
                | GuestFailure::UnpluggedAccess { .. }
                | GuestFailure::ReadOnlyWrite { .. }
        )
    }
}

fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    NAMES.get(v as usize).copied().unwrap_or("exception")
}

/// What one completed command reported.
#[derive(Debug, Clone, Serialize)]
pub struct CommandReport {
    /// Human description.
    pub command: String,
    /// Guest status.
    pub status: u32,
    /// Guest results.
    pub results: [u64; 6],
    /// Wall time from resuming the guest with it to its doorbell.
    pub micros: u64,
}

/// Everything a vCPU thread reports when it ends.
#[derive(Debug, Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: u64,
    /// `None` on success.
    pub failure: Option<GuestFailure>,
    /// Completed commands, in order.
    pub commands: Vec<CommandReport>,
    /// Exits counted by reason.
    pub exits: BTreeMap<&'static str, u64>,
}

impl Serialize for GuestFailure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A line of console output.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Who wrote it: `vcpu0 guest`, `vcpu1 vmm`, `scenario`.
    pub source: String,
    /// Text (without trailing newline).
    pub text: String,
}

/// Sends console lines to the event loop.
#[derive(Debug)]
pub struct ConsoleSender {
    tx: mpsc::Sender<ConsoleLine>,
    event: EventFd,
}

impl ConsoleSender {
    /// A sender that signals `event` after each line.
    pub fn new(tx: mpsc::Sender<ConsoleLine>, event: EventFd) -> Self {
        Self { tx, event }
    }
    fn send(&self, vcpu: u64, text: String, from_vmm: bool) {
        let source = format!("vcpu{vcpu} {}", if from_vmm { "vmm" } else { "guest" });
        self.line(source, text);
    }

    /// Sends `text` attributed to `source`.
    pub fn line(&self, source: String, text: String) {
        // A closed receiver means the run is ending; dropping the line is fine.
        let _ = self.tx.send(ConsoleLine { source, text });
        let _ = self.event.write(1);
    }
}

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u64,
    /// Number of vCPUs of the VM (for resetting registers).
    pub vcpus: u64,
    /// The guest program's entry point (for resetting registers).
    pub entry: Gpa,
    /// The VMM's view of the boot region (for the mailbox).
    pub boot: crate::vm::BootMemory,
    /// The guest memory manager (for accesses that exit as MMIO).
    pub memory: Arc<MemoryManager>,
    /// The DMA engine the guest programs, if the VM has one.
    pub dma: Option<Arc<crate::devices::dma::DmaEngine>>,
    /// Where commands come from.
    pub plan: Box<dyn VcpuPlan>,
    /// Console output.
    pub console: ConsoleSender,
    /// Set to stop the run.
    pub stop: Arc<AtomicBool>,
    /// Print per-command progress lines.
    pub progress: bool,
}

impl fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuContext")
            .field("index", &self.index)
            .finish()
    }
}

struct Mailbox<'a> {
    memory: &'a GuestMemoryMmap,
    base: u64,
}

impl Mailbox<'_> {
    fn read<T: vm_memory::ByteValued>(&self, offset: u64) -> T {
        // The mailbox lies in the boot region, which is always mapped: a failure
        // here is a VMM bug.
        self.memory
            .read_obj(GuestAddress(self.base + offset))
            .expect("mailbox is inside the boot region")
    }
    fn write<T: vm_memory::ByteValued>(&self, offset: u64, v: T) {
        self.memory
            .write_obj(v, GuestAddress(self.base + offset))
            .expect("mailbox is inside the boot region");
    }
    fn post(&self, cmd: &Command) {
        self.write(mailbox_offset::ARGS, cmd.args);
        self.write(mailbox_offset::COMMAND, cmd.code);
    }
    fn console(&self, len: usize) -> String {
        let len = len.min(guest_image::protocol::CONSOLE_BYTES);
        let mut buf = vec![0u8; len];
        self.memory
            .read_slice(&mut buf, GuestAddress(self.base + mailbox_offset::CONSOLE))
            .expect("mailbox is inside the boot region");
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Runs vCPU `ctx.index` until its plan ends or it fails; never panics on guest behaviour.
pub fn run_vcpu(mut vcpu: VcpuFd, mut ctx: VcpuContext) -> VcpuReport {
    let index = ctx.index;
    let boot = ctx.boot.clone();
    let mailbox = Mailbox {
        memory: boot.memory(),
        base: layout::mailbox(index),
    };
    let mut report = VcpuReport {
        index,
        failure: None,
        commands: Vec::new(),
        exits: BTreeMap::new(),
    };
    let mut current: Option<(Command, Instant)> = None;
    let mut stop_posted = false;
    let mut console_pending = String::new();
    let failure = loop {
        if ctx.stop.load(Ordering::Acquire) {
            break Some(GuestFailure::Stopped { vcpu: index });
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                *report.exits.entry("intr").or_default() += 1;
                continue;
            }
            Err(e) => {
                let hint = if e.errno() == libc::EFAULT {
                    " (a guest access hit host memory that is not mapped)"
                } else {
                    ""
                };
                break Some(GuestFailure::Kvm {
                    vcpu: index,
                    error: e.to_string(),
                    hint,
                });
            }
        };
        let (reason, outcome) = match exit {
            VcpuExit::MmioWrite(REG_DOORBELL, data) => {
                let st = u32::from_le_bytes(pad4(data));
                (
                    "mmio_doorbell",
                    on_doorbell(
                        &mut ctx,
                        &mailbox,
                        &mut report,
                        &mut current,
                        &mut stop_posted,
                        st,
                    ),
                )
            }
            VcpuExit::MmioWrite(REG_DMA_SUBMIT, data) => match &ctx.dma {
                // The descriptor must be this vCPU's own (in its mailbox):
                // anything else would leave the guest polling forever.
                Some(dma) if u64::from(u32::from_le_bytes(pad4(data))) == mailbox.base + mailbox_offset::DMA => {
                    dma.submit(mailbox.base + mailbox_offset::DMA);
                    ("mmio_dma", None)
                }
                Some(_) => (
                    "mmio_dma",
                    Some(Err(GuestFailure::UnexpectedExit {
                        vcpu: index,
                        what: format!(
                            "DMA descriptor submitted at {:#x}; it must be the vCPU's own, at {:#x}",
                            u32::from_le_bytes(pad4(data)),
                            mailbox.base + mailbox_offset::DMA
                        ),
                    })),
                ),
                None => (
                    "mmio_dma",
                    Some(Err(GuestFailure::UnexpectedExit {
                        vcpu: index,
                        what: "DMA submitted but this VM has no DMA engine".into(),
                    })),
                ),
            },
            VcpuExit::MmioWrite(REG_CONSOLE, data) => {
                console_pending.push_str(&mailbox.console(u32::from_le_bytes(pad4(data)) as usize));
                while let Some(nl) = console_pending.find('\n') {
                    let line: String = console_pending.drain(..=nl).collect();
                    ctx.console.send(index, line.trim_end().to_string(), false);
                }
                ("mmio_console", None)
            }
            VcpuExit::MmioWrite(REG_EXCEPTION, _) => {
                let r: ExceptionRecord = ExceptionRecord {
                    vector: mailbox.read(mailbox_offset::EXCEPTION),
                    error_code: mailbox.read(mailbox_offset::EXCEPTION + 8),
                    rip: mailbox.read(mailbox_offset::EXCEPTION + 16),
                    cr2: mailbox.read(mailbox_offset::EXCEPTION + 24),
                    rsp: mailbox.read(mailbox_offset::EXCEPTION + 32),
                };
                let f = GuestFailure::Exception {
                    vcpu: index,
                    name: vector_name(r.vector),
                    vector: r.vector,
                    error_code: r.error_code,
                    rip: r.rip,
                    cr2: r.cr2,
                };
                ("mmio_exception", Some(Err(f)))
            }
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => (
                "io",
                Some(Err(GuestFailure::UnexpectedExit {
                    vcpu: index,
                    what: format!("port I/O to port {port:#x} (the protocol uses MMIO registers)"),
                })),
            ),
            VcpuExit::MmioRead(gpa, _) | VcpuExit::MmioWrite(gpa, _)
                if (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&gpa) =>
            {
                (
                    "mmio_register",
                    Some(Err(GuestFailure::UnexpectedExit {
                        vcpu: index,
                        what: format!("access to unknown VMM register {gpa:#x}"),
                    })),
                )
            }
            VcpuExit::MmioRead(gpa, data) => memory_access(&ctx, gpa, data, false),
            VcpuExit::MmioWrite(gpa, data) => {
                let mut buf = [0u8; 8];
                let n = data.len().min(8);
                buf[..n].copy_from_slice(&data[..n]);
                memory_access(&ctx, gpa, &mut buf[..n], true)
            }
            VcpuExit::Intr => ("intr", None),
            VcpuExit::Shutdown => (
                "shutdown",
                Some(Err(GuestFailure::Shutdown { vcpu: index })),
            ),
            other => (
                "other",
                Some(Err(GuestFailure::UnexpectedExit {
                    vcpu: index,
                    what: format!("{other:?}"),
                })),
            ),
        };
        *report.exits.entry(reason).or_default() += 1;
        match outcome {
            None => {}
            Some(Ok(())) => break None,
            // Recoverable only while a command is in flight: a fault outside
            // one (before READY, after STOP) has no step to report to and
            // would otherwise repeat after every reset.
            Some(Err(f)) if f.is_guest_fault() && ctx.plan.recoverable() && current.is_some() => {
                if let Some((cmd, started)) = current.take() {
                    report.commands.push(CommandReport {
                        command: cmd.describe(),
                        status: u32::MAX,
                        results: [0; 6],
                        micros: started.elapsed().as_micros() as u64,
                    });
                }
                ctx.plan.completed(&CommandOutcome::Failed(f.clone()));
                if let Err(e) = reset_guest(&mut vcpu, &ctx) {
                    break Some(e);
                }
            }
            Some(Err(f)) => break Some(f),
        }
    };
    if !console_pending.is_empty() {
        ctx.console.send(index, console_pending, false);
    }
    report.failure = failure;
    report
}

/// Handles a guest access outside the register page (see [`mmio`]).
fn memory_access(
    ctx: &VcpuContext,
    gpa: u64,
    data: &mut [u8],
    write: bool,
) -> (&'static str, Option<Result<(), GuestFailure>>) {
    let vcpu = ctx.index;
    let size = data.len();
    match mmio::emulate(&ctx.memory, gpa, data, write) {
        mmio::Access::Emulated => ("mmio_emulated", None),
        mmio::Access::Unplugged => (
            "mmio_unplugged",
            Some(Err(GuestFailure::UnpluggedAccess {
                vcpu,
                gpa,
                kind: if write { "write" } else { "read" },
                size,
            })),
        ),
        mmio::Access::ReadOnly => (
            "mmio_read_only",
            Some(Err(GuestFailure::ReadOnlyWrite { vcpu, gpa, size })),
        ),
    }
}

/// Completes the pending exit without running guest code, then puts the
/// guest back at the start of its command loop.
fn reset_guest(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Result<(), GuestFailure> {
    let kvm_failure = |e: &dyn fmt::Display| GuestFailure::Kvm {
        vcpu: ctx.index,
        error: format!("resetting the guest: {e}"),
        hint: "",
    };
    // An access split in fragments (e.g. crossing a page) exits once per
    // fragment: complete each one (reads get zeros) until KVM reports EINTR,
    // i.e. nothing is pending; only then may the registers be replaced.
    vcpu.set_kvm_immediate_exit(1);
    let mut completed = Ok(());
    for _ in 0..64 {
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(_) => break,
            Err(e) if e.errno() == libc::EINTR => break,
            Err(e) => {
                completed = Err(e);
                break;
            }
        }
    }
    vcpu.set_kvm_immediate_exit(0);
    completed.map_err(|e| kvm_failure(&e))?;
    crate::vm::setup_vcpu_registers(vcpu, ctx.index, ctx.vcpus, ctx.entry)
        .map_err(|e| kvm_failure(&e))
}

fn pad4(data: &[u8]) -> [u8; 4] {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    b
}

/// Handles a doorbell: records the finished command, posts the next one.
/// `Some(Ok(()))` = the plan ended, `Some(Err)` = failure, `None` = keep running.
fn on_doorbell(
    ctx: &mut VcpuContext,
    mailbox: &Mailbox<'_>,
    report: &mut VcpuReport,
    current: &mut Option<(Command, Instant)>,
    stop_posted: &mut bool,
    st: u32,
) -> Option<Result<(), GuestFailure>> {
    let index = ctx.index;
    if st == status::STOPPED {
        // Success only in answer to a STOP the VMM posted.
        return Some(if *stop_posted && current.is_none() {
            Ok(())
        } else {
            Err(GuestFailure::UnexpectedExit {
                vcpu: index,
                what: "the guest reported STOPPED without being told to stop".into(),
            })
        });
    }
    if let Some((cmd, started)) = current.take() {
        let results: [u64; 6] = mailbox.read(mailbox_offset::RESULTS);
        let elapsed = started.elapsed();
        report.commands.push(CommandReport {
            command: cmd.describe(),
            status: st,
            results,
            micros: elapsed.as_micros() as u64,
        });
        let is_verify = cmd.code == command::VERIFY || cmd.code == command::VERIFY_CONST;
        let failure = if st == status::MISMATCH && is_verify {
            Some(GuestFailure::VerifyMismatch {
                vcpu: index,
                gpa: results[0],
                expected: results[1],
                actual: results[2],
            })
        } else if st != status::OK {
            Some(GuestFailure::CommandFailed {
                vcpu: index,
                command: cmd.describe(),
                status: st,
            })
        } else {
            None
        };
        match failure {
            Some(f) if ctx.plan.recoverable() => ctx.plan.completed(&CommandOutcome::Failed(f)),
            Some(f) => return Some(Err(f)),
            None => ctx.plan.completed(&CommandOutcome::Done { results }),
        }
        if ctx.progress && cmd.code != command::HELLO {
            ctx.console.send(
                index,
                format!("{} ok in {}", cmd.describe(), fmt_duration(elapsed)),
                true,
            );
        }
    } else if st != status::READY {
        return Some(Err(GuestFailure::UnexpectedExit {
            vcpu: index,
            what: format!("doorbell with status {st:#x} before any command"),
        }));
    }
    match ctx.plan.next() {
        Ok(Step::Run(cmd)) => {
            mailbox.post(&cmd);
            *current = Some((cmd, Instant::now()));
            None
        }
        Ok(Step::Stop) => {
            mailbox.post(&Command::new(command::STOP, [0; 6]));
            *stop_posted = true;
            None
        }
        Err(_) => Some(Err(GuestFailure::Stopped { vcpu: index })),
    }
}

/// `1.234 ms`-style formatting.
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}
