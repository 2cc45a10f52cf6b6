//! Which of KVM's three dirty-log interfaces a VM uses: [`DirtyLogMode`].
//!
//! - [`Bitmap`](DirtyLogMode::Bitmap): `KVM_GET_DIRTY_LOG` returns and clears
//!   a slot's whole bitmap; enabling logging write-protects the whole slot.
//! - [`Manual`](DirtyLogMode::Manual): `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//!   with `KVM_DIRTY_LOG_INITIALLY_SET`, as QEMU uses it: enabling logging
//!   sets every bit and write-protects nothing; `KVM_GET_DIRTY_LOG` only
//!   reads; `KVM_CLEAR_DIRTY_LOG` clears (and write-protects) by range. So
//!   the first report after logging starts on a slot names every page of it.
//! - [`Ring`](DirtyLogMode::Ring): `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, one ring
//!   of `(slot, offset)` entries per vCPU mapped from its fd, harvested with
//!   the acquire/release protocol and `KVM_RESET_DIRTY_RINGS`
//!   (`vmm::kvm::dirty_ring`). `KVM_GET_DIRTY_LOG` is refused by KVM then.

use std::fmt;
use std::str::FromStr;

/// A VM's dirty-log interface; see the module docs.
///
/// ```
/// use vmm::mm::manager::DirtyLogMode;
/// let mode: DirtyLogMode = "ring".parse().unwrap();
/// assert_eq!(mode, DirtyLogMode::Ring);
/// assert_eq!(mode.to_string(), "ring");
/// assert!("rings".parse::<DirtyLogMode>().unwrap_err().contains("bitmap, manual, ring"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG`: read and clear a slot's bitmap.
    #[default]
    Bitmap,
    /// `KVM_GET_DIRTY_LOG` reads, `KVM_CLEAR_DIRTY_LOG` clears by range
    /// (manual protect, initially set).
    Manual,
    /// Per-vCPU dirty rings and `KVM_RESET_DIRTY_RINGS`.
    Ring,
}

impl DirtyLogMode {
    /// All modes, in the order the CLI lists them.
    pub const ALL: [DirtyLogMode; 3] = [Self::Bitmap, Self::Manual, Self::Ring];

    /// The name the CLI and scenario files use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::Manual => "manual",
            Self::Ring => "ring",
        }
    }

    /// Whether reading the log leaves it set until a separate clear (manual).
    pub fn read_keeps_log(self) -> bool {
        self == Self::Manual
    }

    /// Whether starting to log on a slot marks all its pages dirty (manual,
    /// `KVM_DIRTY_LOG_INITIALLY_SET`).
    pub fn initially_set(self) -> bool {
        self == Self::Manual
    }
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DirtyLogMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown dirty-log mode {s:?} (expected one of bitmap, manual, ring)")
            })
    }
}
