//! The errors of the memory manager: which call failed, on which slot, why.

use std::fmt;
use std::io;

use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::backing::BackingError;
use crate::mm::guard::GuardError;
use crate::mm::notifier::NotifierError;
use crate::mm::slot_map::{MemslotSpec, SlotMapError};

/// Which memslot call failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemslotOp {
    /// `KVM_SET_USER_MEMORY_REGION` creating a slot.
    Create,
    /// `KVM_SET_USER_MEMORY_REGION` with `memory_size = 0`.
    Delete,
    /// `KVM_SET_USER_MEMORY_REGION` changing only `KVM_MEM_LOG_DIRTY_PAGES`.
    SetFlags,
    /// `KVM_GET_DIRTY_LOG` (harvesting before a delete or logging-off, or for
    /// [`MemoryManager::dirty_pages`](super::MemoryManager::dirty_pages)).
    GetDirtyLog,
    /// `KVM_CLEAR_DIRTY_LOG` (manual dirty-log mode).
    ClearDirtyLog,
}

impl fmt::Display for MemslotOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemslotOp::Create => "create",
            MemslotOp::Delete => "delete",
            MemslotOp::SetFlags => "set flags",
            MemslotOp::GetDirtyLog => "get dirty log",
            MemslotOp::ClearDirtyLog => "clear dirty log",
        })
    }
}

/// Why a memslot call failed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum FailureCause {
    /// KVM returned this errno.
    Errno(i32),
    /// The manager refused the call before issuing it: given what KVM holds
    /// (the mirror), KVM would reject it or it would do something else than
    /// the change says.
    Refused(String),
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Errno(e) => {
                write!(f, "errno {e} ({})", io::Error::from_raw_os_error(*e))
            }
            FailureCause::Refused(why) => write!(f, "refused before the ioctl: {why}"),
        }
    }
}

/// One failed memslot call: what, on which slot, and why.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "{op} of {} at {} size {:#x} (hva {}, flags {:#x}): {cause}",
    spec.id, spec.gpa, spec.size, spec.hva, spec.flags.bits()
)]
pub struct MemslotFailure {
    /// The call.
    pub op: MemslotOp,
    /// The slot as the call described it.
    pub spec: MemslotSpec,
    /// Why it failed.
    pub cause: FailureCause,
}

impl MemslotFailure {
    /// The errno KVM returned, if the call was issued.
    pub fn errno(&self) -> Option<i32> {
        match self.cause {
            FailureCause::Errno(e) => Some(e),
            FailureCause::Refused(_) => None,
        }
    }
}

/// Why [`MemoryManager`](super::MemoryManager) could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// The slot map refused the op; no ioctl was issued, nothing changed.
    #[error("refused before any ioctl: {0}")]
    SlotMap(#[from] SlotMapError),
    /// A subscriber of the invalidation hub vetoed the op; no ioctl was
    /// issued, nothing changed.
    #[error("refused before any ioctl: {0}")]
    Vetoed(#[from] NotifierError),
    /// Guard holders did not leave a slot the op must change within the
    /// drain bound (the error names the slot and the readers); no ioctl was
    /// issued, nothing changed. Or (only for a transition computed from
    /// another map) the slot cells were out of step with KVM.
    #[error("{0}")]
    Guard(GuardError),
    /// The op was applied, but announcing plugged memory to the hub failed.
    #[error("op applied, but announcing added memory failed: {0}")]
    Announce(NotifierError),
    /// Change `index` of `total` failed; the `index` changes before it were
    /// undone, so KVM and the published map are as before the op.
    #[error("change {index} of {total} failed: {failure}; undid the {index} applied change(s), KVM and the map are unchanged")]
    RolledBack {
        /// Position of the failed change in `Transition::changes`.
        index: usize,
        /// Number of changes in the transition.
        total: usize,
        /// The failure.
        failure: MemslotFailure,
    },
    /// A change failed and undoing an earlier one failed too: KVM now differs
    /// from the published map (the mirror still shows what KVM holds) and
    /// the manager refuses further ops.
    #[error("change {index} failed: {failure}; undoing failed too: {undo}; KVM no longer matches the map")]
    RollbackFailed {
        /// Position of the failed change.
        index: usize,
        /// The failure.
        failure: MemslotFailure,
        /// The undo that failed.
        undo: Box<MemslotFailure>,
    },
    /// An earlier rollback failed; see [`MemslotError::RollbackFailed`].
    #[error("an earlier rollback failed; KVM no longer matches the slot map")]
    Poisoned,
    /// The op was applied and published, but releasing host memory failed.
    #[error("op applied, but discarding [{offset:#x}, +{len:#x}) of the mapping at {hva} failed: {source}")]
    Discard {
        /// The mapping's base address.
        hva: Hva,
        /// Offset into it.
        offset: u64,
        /// Length.
        len: u64,
        /// The error.
        source: BackingError,
    },
    /// A range whose end overflows.
    #[error("range {gpa} + {size:#x} overflows")]
    RangeOverflow {
        /// Start.
        gpa: Gpa,
        /// Size.
        size: u64,
    },
    /// No slot overlapping the range logs dirty pages, and no page harvested
    /// from one that did is pending: there is no dirty log to read.
    #[error("no slot in {range} logs dirty pages (switch dirty logging on first)")]
    NotLogging {
        /// The range asked for.
        range: GpaRange,
    },
    /// Reading a dirty log failed.
    #[error("reading dirty pages: {0}")]
    DirtyLog(MemslotFailure),
    /// Harvesting or resetting the dirty rings failed (entries collected
    /// before the failure are kept).
    #[error("harvesting the dirty rings: {0}")]
    DirtyRings(std::io::Error),
    /// The dirty-bitmap buffer could not be mapped.
    #[error("dirty-bitmap buffer: {0}")]
    Buffer(BackingError),
}
