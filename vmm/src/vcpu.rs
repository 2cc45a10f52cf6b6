//! A vCPU thread: runs `KVM_RUN`, answers the guest's doorbell (an MMIO store) with the next
//! command of its plan, forwards console text, and turns every other exit into
//! a clear [`GuestFailure`].
//!
//! The loop never reads guest registers: everything the guest reports travels
//! through its mailbox page (a vCPU ioctl costs ~6 µs on this host).
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
    REG_DOORBELL, REG_EXCEPTION,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::plan::{Command, Step, VcpuPlan};

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

/// A line of console output from a vCPU.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// vCPU index.
    pub vcpu: u64,
    /// Text (without trailing newline).
    pub text: String,
    /// Whether the VMM (not the guest) wrote it.
    pub from_vmm: bool,
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
        // A closed receiver means the run is ending; dropping the line is fine.
        let _ = self.tx.send(ConsoleLine {
            vcpu,
            text,
            from_vmm,
        });
        let _ = self.event.write(1);
    }
}

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u64,
    /// The VMM's view of guest memory (for the mailbox).
    pub memory: GuestMemoryMmap,
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
    let memory = ctx.memory.clone();
    let mailbox = Mailbox {
        memory: &memory,
        base: layout::mailbox(index),
    };
    let mut report = VcpuReport {
        index,
        failure: None,
        commands: Vec::new(),
        exits: BTreeMap::new(),
    };
    let mut current: Option<(Command, Instant)> = None;
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
                    on_doorbell(&mut ctx, &mailbox, &mut report, &mut current, st),
                )
            }
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
            VcpuExit::MmioRead(gpa, data) => (
                "mmio_unplugged",
                Some(Err(GuestFailure::UnpluggedAccess {
                    vcpu: index,
                    gpa,
                    kind: "read",
                    size: data.len(),
                })),
            ),
            VcpuExit::MmioWrite(gpa, data) => (
                "mmio_unplugged",
                Some(Err(GuestFailure::UnpluggedAccess {
                    vcpu: index,
                    gpa,
                    kind: "write",
                    size: data.len(),
                })),
            ),
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
            Some(Err(f)) => break Some(f),
        }
    };
    if !console_pending.is_empty() {
        ctx.console.send(index, console_pending, false);
    }
    report.failure = failure;
    report
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
    st: u32,
) -> Option<Result<(), GuestFailure>> {
    let index = ctx.index;
    if st == status::STOPPED {
        return Some(Ok(()));
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
        if st == status::MISMATCH && cmd.code == command::VERIFY {
            return Some(Err(GuestFailure::VerifyMismatch {
                vcpu: index,
                gpa: results[0],
                expected: results[1],
                actual: results[2],
            }));
        }
        if st != status::OK {
            return Some(Err(GuestFailure::CommandFailed {
                vcpu: index,
                command: cmd.describe(),
                status: st,
            }));
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
