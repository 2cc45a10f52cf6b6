//! What a step did ([`Outcome`]) and what it must do ([`Expect`]). Every
//! outcome has one name, listed in `scenarios/README.md`; an expectation is
//! an outcome, several separated by `|`, or `"error"` (anything but ok).
//!
//! ```
//! use vmm::scenario::expect::{Expect, Outcome};
//! let e: Expect = "ok|dma-revoked".parse().unwrap();
//! assert!(e.accepts(Outcome::DmaRevoked) && !e.accepts(Outcome::DmaFault));
//! assert!("error".parse::<Expect>().unwrap().accepts(Outcome::Overlap));
//! assert!("sideways".parse::<Expect>().unwrap_err().to_string().contains("sideways"));
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// What happened in a step, by one stable name.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
pub enum Outcome {
    /// The step did what it said.
    #[strum(serialize = "ok")]
    Ok,
    /// Memory op: the range overlaps a slot (or the boot region).
    #[strum(serialize = "overlap")]
    Overlap,
    /// Memory op: an address or size is not page-aligned.
    #[strum(serialize = "misaligned")]
    Misaligned,
    /// Memory op: the size is zero.
    #[strum(serialize = "zero-size")]
    ZeroSize,
    /// Memory op: beyond the guest-physical address width.
    #[strum(serialize = "beyond-max-gpa")]
    BeyondMaxGpa,
    /// Memory op: the range wraps around the address space.
    #[strum(serialize = "range-overflow")]
    RangeOverflow,
    /// Memory op: the slot budget is full.
    #[strum(serialize = "too-many-slots")]
    TooManySlots,
    /// Memory op or pin: nothing is plugged there.
    #[strum(serialize = "not-plugged")]
    NotPlugged,
    /// Memory op: part of the range is not plugged.
    #[strum(serialize = "hole")]
    Hole,
    /// Memory op: the range is fixed (the boot region).
    #[strum(serialize = "fixed")]
    Fixed,
    /// Memory op: no slot starts at the address.
    #[strum(serialize = "no-slot-at")]
    NoSlotAt,
    /// move: the destination overlaps the source.
    #[strum(serialize = "destination-overlaps-source")]
    DestinationOverlapsSource,
    /// plug or resize: the memslot would hold more pages than KVM allows
    /// in one (`KVM_MEM_MAX_NR_PAGES`, 2^31 - 1 pages of 4 KiB).
    #[strum(serialize = "slot-too-large")]
    SlotTooLarge,
    /// resize: no room to grow.
    #[strum(serialize = "no-room-to-grow")]
    NoRoomToGrow,
    /// plug: the host mapping is smaller than the slot.
    #[strum(serialize = "mapping-too-small")]
    MappingTooSmall,
    /// plug: the host memory is already mapped elsewhere.
    #[strum(serialize = "host-aliased")]
    HostAliased,
    /// plug: KVM does not support read-only slots.
    #[strum(serialize = "read-only-unsupported")]
    ReadOnlyUnsupported,
    /// plug: an unknown slot flag.
    #[strum(serialize = "invalid-flags")]
    InvalidFlags,
    /// plug: an unknown backing kind.
    #[strum(serialize = "unknown-backing")]
    UnknownBacking,
    /// plug: the host memory could not be allocated.
    #[strum(serialize = "backing")]
    Backing,
    /// Memory op over the VMM register page.
    #[strum(serialize = "reserved")]
    Reserved,
    /// Memory op: KVM refused the change.
    #[strum(serialize = "kvm")]
    Kvm,
    /// Memory op: KVM refused and the change was rolled back.
    #[strum(serialize = "kvm-rolled-back")]
    KvmRolledBack,
    /// KVM's memslots and the slot map differ after the op.
    #[strum(serialize = "inconsistent")]
    Inconsistent,
    /// Memory op: a non-revocable pin refused the change.
    #[strum(serialize = "vetoed")]
    Vetoed,
    /// Memory op or pin: readers did not drain in time.
    #[strum(serialize = "busy")]
    Busy,
    /// dirty-pages: other dirty pages than expected (a different number,
    /// or a page missing from or not in the expected set).
    #[strum(serialize = "dirty-count")]
    DirtyCount,
    /// dirty-pages: no slot in the range logs dirty pages.
    #[strum(serialize = "not-logging")]
    NotLogging,
    /// dirty-pages: the IOMMU's dirty bits could not be read.
    #[strum(serialize = "stage2")]
    Stage2,
    /// stage2-dump: different runs or bytes mapped.
    #[strum(serialize = "stage2-mismatch")]
    Stage2Mismatch,
    /// check with `pages`: a different number of pinned pages.
    #[strum(serialize = "pinned-pages")]
    PinnedPages,
    /// pin: the pin limit would be exceeded.
    #[strum(serialize = "pin-limit")]
    PinLimit,
    /// pin: the range is empty, unaligned or wraps.
    #[strum(serialize = "bad-range")]
    BadRange,
    /// pin: mlock failed.
    #[strum(serialize = "mlock")]
    Mlock,
    /// pin: a pin of that name is already held.
    #[strum(serialize = "duplicate-pin")]
    DuplicatePin,
    /// unpin: no pin of that name is held.
    #[strum(serialize = "no-such-pin")]
    NoSuchPin,
    /// Guest command: the guest saw a value other than the expected one
    /// (verify, verify-const, read with `value`, dma-checksum with `value`).
    #[strum(serialize = "mismatch")]
    Mismatch,
    /// Guest command: an access exited to the VMM on unplugged memory.
    #[strum(serialize = "unplugged")]
    Unplugged,
    /// Guest command: a write to read-only memory (also pin: the range is read-only).
    #[strum(serialize = "read-only")]
    ReadOnly,
    /// Guest command: the guest took an exception.
    #[strum(serialize = "exception")]
    Exception,
    /// Guest command: the guest refused the command or failed otherwise.
    #[strum(serialize = "command-failed")]
    CommandFailed,
    /// DMA step: the engine faulted (memory not plugged or not writable).
    #[strum(serialize = "dma-fault")]
    DmaFault,
    /// DMA step: the pin limit refused the transfer.
    #[strum(serialize = "dma-no-pin")]
    DmaNoPin,
    /// DMA step: the memory changed under the transfer (its pin was revoked).
    #[strum(serialize = "dma-revoked")]
    DmaRevoked,
    /// DMA step: the engine found the request invalid.
    #[strum(serialize = "dma-invalid")]
    DmaInvalid,
    /// The run stopped (timeout, signal, a vCPU gone) before the step finished.
    #[strum(serialize = "stopped")]
    Stopped,
}

impl Outcome {
    /// Every outcome, in the README's order.
    pub const ALL: &'static [Outcome] = <Outcome as strum::VariantArray>::VARIANTS;

    /// Its name in scenario files and reports.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<&crate::devices::pins::PinError> for Outcome {
    /// The outcome of a pin step the pin manager refused.
    fn from(e: &crate::devices::pins::PinError) -> Self {
        use crate::devices::pins::PinError;
        match e {
            PinError::BadRange { .. } => Outcome::BadRange,
            PinError::NotPlugged { .. } => Outcome::NotPlugged,
            PinError::ReadOnly { .. } => Outcome::ReadOnly,
            PinError::Limit { .. } => Outcome::PinLimit,
            PinError::Mlock { .. } => Outcome::Mlock,
            PinError::Busy { .. } => Outcome::Busy,
        }
    }
}

/// An expectation that is not one of the documented names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown expectation {name:?}: expected \"error\" or outcomes separated by `|` ({})", Outcome::ALL.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "))]
pub struct ExpectError {
    /// The name given.
    pub name: String,
}

impl FromStr for Outcome {
    type Err = ExpectError;
    fn from_str(s: &str) -> Result<Self, ExpectError> {
        Outcome::ALL
            .iter()
            .copied()
            .find(|o| o.name() == s)
            .ok_or_else(|| ExpectError {
                name: s.to_string(),
            })
    }
}

/// What must happen in a step (`expect = ...`, default `"ok"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Any of these outcomes (one, or several written `"a|b"`).
    AnyOf(Vec<Outcome>),
    /// Anything but ok (`"error"`).
    Error,
}

impl Default for Expect {
    fn default() -> Self {
        Expect::AnyOf(vec![Outcome::Ok])
    }
}

impl Expect {
    /// Whether `outcome` meets this expectation.
    pub fn accepts(&self, outcome: Outcome) -> bool {
        match self {
            Expect::AnyOf(list) => list.contains(&outcome),
            Expect::Error => outcome != Outcome::Ok,
        }
    }

    /// Whether this is the default, `"ok"`.
    pub fn is_ok(&self) -> bool {
        *self == Expect::default()
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Error => f.write_str("error"),
            Expect::AnyOf(list) => {
                let names: Vec<_> = list.iter().map(|o| o.name()).collect();
                f.write_str(&names.join("|"))
            }
        }
    }
}

impl FromStr for Expect {
    type Err = ExpectError;
    /// Accepts the documented names; also the older `"failed"` (now
    /// `"error"`) and `"ok-or-unplugged"` (now `"ok|unplugged"`).
    fn from_str(s: &str) -> Result<Self, ExpectError> {
        match s.trim() {
            "error" | "failed" => return Ok(Expect::Error),
            "ok-or-unplugged" => return Ok(Expect::AnyOf(vec![Outcome::Ok, Outcome::Unplugged])),
            _ => {}
        }
        let mut list = Vec::new();
        for part in s.split('|').map(str::trim) {
            let o: Outcome = part.parse()?;
            if !list.contains(&o) {
                list.push(o);
            }
        }
        Ok(Expect::AnyOf(list))
    }
}

impl Serialize for Expect {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_outcome_name_parses_back() {
        for o in Outcome::ALL {
            assert_eq!(o.name().parse::<Outcome>(), Ok(*o));
            let e: Expect = o.name().parse().unwrap();
            assert_eq!(e.to_string().parse::<Expect>(), Ok(e));
        }
    }

    #[test]
    fn test_unknown_expectation_is_refused_naming_it() {
        for bad in ["sideways", "ok|nope", "", "wrong-value"] {
            let e = bad.parse::<Expect>().unwrap_err();
            assert!(e.to_string().contains("unknown expectation"), "{e}");
        }
    }

    #[test]
    fn test_older_names_mean_the_same() {
        let e: Expect = "ok-or-unplugged".parse().unwrap();
        assert!(e.accepts(Outcome::Ok) && e.accepts(Outcome::Unplugged));
        assert!(!e.accepts(Outcome::Mismatch));
        assert_eq!("failed".parse::<Expect>(), Ok(Expect::Error));
        assert!(!Expect::Error.accepts(Outcome::Ok));
    }
}
