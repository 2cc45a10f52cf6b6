//! The op kinds a churn writer runs next to a timed guest pass, and one op
//! each: what it does to the range, through which path of the kernel.
//!
//! ```
//! use vmm::bench::ChurnOp;
//! use std::time::Duration;
//! assert_eq!("dirty-log".parse::<ChurnOp>().unwrap(), ChurnOp::DirtyLog);
//! assert_eq!("stall=3ms".parse::<ChurnOp>().unwrap(), ChurnOp::Stall(Duration::from_millis(3)));
//! assert!("bogus".parse::<ChurnOp>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::mm::addr::{Gpa, HUGE_2M};
use crate::mm::backing::HostMapping;
use crate::mm::manager::MemoryManager;
use crate::mm::slot_map::SlotFlags;
use crate::units::parse_duration;

/// The longest a planted `stall` may hold the range read-only.
pub const MAX_STALL: Duration = Duration::from_secs(1);

/// `MADV_COLLAPSE` (Linux 6.1): collapse the range's pages into THPs now.
const MADV_COLLAPSE: i32 = 25;

/// Errors of the churn ops and flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChurnError {
    /// An unknown op name.
    #[error("unknown churn op {0:?}: expected plug, protect, dontneed, collapse or dirty-log")]
    UnknownOp(String),
    /// A `stall=` duration that is not a duration up to [`MAX_STALL`].
    #[error("stall={0}: expected a duration up to 1s (e.g. stall=5ms)")]
    Stall(String),
    /// A host call of an op failed.
    #[error("{op}: {what} failed: {reason}")]
    Op {
        /// The op kind.
        op: &'static str,
        /// The call.
        what: &'static str,
        /// The OS or memory-manager error, as text.
        reason: String,
    },
}

/// One kind of op the writer runs while the guest is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChurnOp {
    /// Plug, on the next op unplug, 2 MiB of fresh anonymous memory right
    /// after the range, through the memory manager (a memslot change next
    /// to the range: KVM's memslot_modification_stress_test's op).
    Plug,
    /// `mprotect(PROT_READ)` a 2 MiB window of the range's host mapping and
    /// restore read-write in the same op: the mmu notifier zaps KVM's
    /// mappings; a guest write meanwhile waits (`KVM_RUN` fails with EFAULT
    /// and the vCPU retries until the protection is back).
    Protect,
    /// `MADV_DONTNEED` (or `MADV_REMOVE` for shared kinds) of a 2 MiB
    /// window: the pages go; guest accesses there fault again.
    Dontneed,
    /// `MADV_COLLAPSE` of a 2 MiB window: khugepaged's work done
    /// synchronously, which invalidates the window for KVM.
    Collapse,
    /// Toggle dirty logging on the range's memslot through the memory
    /// manager: turning it on write-protects KVM's mappings.
    DirtyLog,
    /// A deliberately slow op, for tests: the whole range read-only for the
    /// given time. Every guest write in that window waits for it.
    Stall(Duration),
}

impl ChurnOp {
    /// The name in tables and JSON (`stall` without its duration).
    pub fn name(self) -> &'static str {
        match self {
            ChurnOp::Plug => "plug",
            ChurnOp::Protect => "protect",
            ChurnOp::Dontneed => "dontneed",
            ChurnOp::Collapse => "collapse",
            ChurnOp::DirtyLog => "dirty-log",
            ChurnOp::Stall(_) => "stall",
        }
    }

    /// Whether a guest write may find the range's host pages read-only
    /// during this op (the vCPU must then wait out EFAULT).
    pub fn makes_read_only(self) -> bool {
        matches!(self, ChurnOp::Protect | ChurnOp::Stall(_))
    }
}

impl fmt::Display for ChurnOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChurnOp::Stall(d) => write!(f, "stall={d:?}"),
            op => f.write_str(op.name()),
        }
    }
}

impl FromStr for ChurnOp {
    type Err = ChurnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "plug" => ChurnOp::Plug,
            "protect" => ChurnOp::Protect,
            "dontneed" => ChurnOp::Dontneed,
            "collapse" => ChurnOp::Collapse,
            "dirty-log" => ChurnOp::DirtyLog,
            t => match t.strip_prefix("stall=") {
                Some(d) => parse_duration(d)
                    .ok()
                    .filter(|d| *d <= MAX_STALL)
                    .map(ChurnOp::Stall)
                    .ok_or_else(|| ChurnError::Stall(d.to_string()))?,
                None => return Err(ChurnError::UnknownOp(s.to_string())),
            },
        })
    }
}

/// What the ops act on: the test range (its host mapping, plugged at
/// `base`) and the memory manager of its VM.
#[derive(Debug)]
pub struct ChurnTarget {
    /// The VM's memory manager.
    pub memory: Arc<MemoryManager>,
    /// The test range's host mapping.
    pub test: Arc<HostMapping>,
    /// Guest-physical base of the test range.
    pub base: Gpa,
    /// Memory plugged next to the range by [`ChurnOp::Plug`].
    pub neighbour: Arc<HostMapping>,
}

/// The writer's state between ops: which window is next, whether the
/// neighbour is plugged, whether dirty logging is on.
#[derive(Debug, Default)]
pub struct ChurnState {
    next_window: u64,
    plugged: bool,
    dirty_log: bool,
}

/// Size of the window one op acts on (the whole range if smaller).
pub const WINDOW: u64 = HUGE_2M;

impl ChurnTarget {
    /// Guest-physical address of the neighbour: the first 2 MiB boundary at
    /// or after the range's end.
    pub fn neighbour_gpa(&self) -> Gpa {
        Gpa((self.base.0 + self.test.len()).next_multiple_of(HUGE_2M))
    }

    fn window(&self, st: &mut ChurnState) -> (u64, u64) {
        let len = WINDOW.min(self.test.len());
        let windows = self.test.len() / len;
        let off = (st.next_window % windows) * len;
        st.next_window += 1;
        (off, len)
    }

    fn mprotect(&self, op: ChurnOp, off: u64, len: u64, prot: i32) -> Result<(), ChurnError> {
        // SAFETY: [off, off + len) lies inside the test mapping (windows are
        // cut from its length), which `self.test` keeps alive. Changing its
        // protection is safe for this process: nothing of ours writes to it
        // (only the guest does, and its writes wait for the restore).
        let rc = unsafe {
            libc::mprotect(
                self.test.as_ptr().add(off as usize).cast(),
                len as usize,
                prot,
            )
        };
        if rc != 0 {
            return Err(os_err(op, "mprotect"));
        }
        Ok(())
    }

    /// Runs one op.
    pub fn run(&self, op: ChurnOp, st: &mut ChurnState) -> Result<(), ChurnError> {
        let name = op.name();
        match op {
            ChurnOp::Plug => {
                let gpa = self.neighbour_gpa();
                let len = self.neighbour.len();
                let r = if st.plugged {
                    self.memory.apply(|m| m.unplug(gpa, len))
                } else {
                    let mem = self.neighbour.clone();
                    self.memory
                        .apply(|m| m.plug(gpa, len, mem, 0, SlotFlags::NONE))
                };
                r.map_err(|e| mm_err(name, if st.plugged { "unplug" } else { "plug" }, e))?;
                st.plugged = !st.plugged;
            }
            ChurnOp::Protect => {
                let (off, len) = self.window(st);
                self.mprotect(op, off, len, libc::PROT_READ)?;
                self.mprotect(op, off, len, libc::PROT_READ | libc::PROT_WRITE)?;
            }
            ChurnOp::Stall(hold) => {
                let len = self.test.len();
                self.mprotect(op, 0, len, libc::PROT_READ)?;
                std::thread::sleep(hold);
                self.mprotect(op, 0, len, libc::PROT_READ | libc::PROT_WRITE)?;
            }
            ChurnOp::Dontneed => {
                let (off, len) = self.window(st);
                self.test.discard(off, len).map_err(|e| ChurnError::Op {
                    op: name,
                    what: "discard",
                    reason: e.to_string(),
                })?;
            }
            ChurnOp::Collapse => {
                let (off, len) = self.window(st);
                // SAFETY: advice on a window inside our live test mapping;
                // MADV_COLLAPSE only changes how its pages are mapped.
                let rc = unsafe {
                    libc::madvise(
                        self.test.as_ptr().add(off as usize).cast(),
                        len as usize,
                        MADV_COLLAPSE,
                    )
                };
                if rc != 0 {
                    return Err(os_err(op, "madvise(MADV_COLLAPSE)"));
                }
            }
            ChurnOp::DirtyLog => {
                let on = !st.dirty_log;
                let len = self.test.len();
                self.memory
                    .apply(|m| m.set_dirty_log(self.base, len, on))
                    .map_err(|e| mm_err(name, "set_dirty_log", e))?;
                st.dirty_log = on;
            }
        }
        Ok(())
    }

    /// Undoes what ops left behind: unplugs the neighbour, turns dirty
    /// logging off.
    pub fn restore(&self, st: &mut ChurnState) -> Result<(), ChurnError> {
        if st.plugged {
            self.run(ChurnOp::Plug, st)?;
        }
        if st.dirty_log {
            self.run(ChurnOp::DirtyLog, st)?;
        }
        Ok(())
    }
}

fn os_err(op: ChurnOp, what: &'static str) -> ChurnError {
    ChurnError::Op {
        op: op.name(),
        what,
        reason: std::io::Error::last_os_error().to_string(),
    }
}

fn mm_err(op: &'static str, what: &'static str, e: crate::mm::manager::MemslotError) -> ChurnError {
    ChurnError::Op {
        op,
        what,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_churn_op_names_roundtrip_and_bad_names_are_named() {
        for s in ["plug", "protect", "dontneed", "collapse", "dirty-log"] {
            assert_eq!(s.parse::<ChurnOp>().unwrap().to_string(), s);
        }
        let e = "plugg".parse::<ChurnOp>().unwrap_err().to_string();
        assert!(e.contains("\"plugg\"") && e.contains("dirty-log"), "{e}");
        let e = "stall=5s".parse::<ChurnOp>().unwrap_err().to_string();
        assert!(e.contains("up to 1s"), "stalls are bounded: {e}");
        assert!(ChurnOp::Stall(Duration::ZERO).makes_read_only());
        assert!(!ChurnOp::Plug.makes_read_only());
    }
}
