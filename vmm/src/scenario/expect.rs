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

macro_rules! outcomes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What happened in a step, by one stable name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Outcome {
            $($(#[$doc])* $variant,)*
        }

        impl Outcome {
            /// Every outcome, in the README's order.
            pub const ALL: &'static [Outcome] = &[$(Outcome::$variant,)*];

            /// Its name in scenario files and reports.
            pub fn name(self) -> &'static str {
                match self {
                    $(Outcome::$variant => $name,)*
                }
            }
        }
    };
}

outcomes! {
    /// The step did what it said.
    Ok = "ok",
    /// Memory op: the range overlaps a slot (or the boot region).
    Overlap = "overlap",
    /// Memory op: an address or size is not page-aligned.
    Misaligned = "misaligned",
    /// Memory op: the size is zero.
    ZeroSize = "zero-size",
    /// Memory op: beyond the guest-physical address width.
    BeyondMaxGpa = "beyond-max-gpa",
    /// Memory op: the range wraps around the address space.
    RangeOverflow = "range-overflow",
    /// Memory op: the slot budget is full.
    TooManySlots = "too-many-slots",
    /// Memory op or pin: nothing is plugged there.
    NotPlugged = "not-plugged",
    /// Memory op: part of the range is not plugged.
    Hole = "hole",
    /// Memory op: the range is fixed (the boot region).
    Fixed = "fixed",
    /// Memory op: no slot starts at the address.
    NoSlotAt = "no-slot-at",
    /// move: the destination overlaps the source.
    DestinationOverlapsSource = "destination-overlaps-source",
    /// resize: no room to grow.
    NoRoomToGrow = "no-room-to-grow",
    /// plug: the host mapping is smaller than the slot.
    MappingTooSmall = "mapping-too-small",
    /// plug: the host memory is already mapped elsewhere.
    HostAliased = "host-aliased",
    /// plug: KVM does not support read-only slots.
    ReadOnlyUnsupported = "read-only-unsupported",
    /// plug: an unknown slot flag.
    InvalidFlags = "invalid-flags",
    /// plug: an unknown backing kind.
    UnknownBacking = "unknown-backing",
    /// plug: the host memory could not be allocated.
    Backing = "backing",
    /// Memory op over the VMM register page.
    Reserved = "reserved",
    /// Memory op: KVM refused the change.
    Kvm = "kvm",
    /// Memory op: KVM refused and the change was rolled back.
    KvmRolledBack = "kvm-rolled-back",
    /// KVM's memslots and the slot map differ after the op.
    Inconsistent = "inconsistent",
    /// Memory op: a non-revocable pin refused the change.
    Vetoed = "vetoed",
    /// Memory op or pin: readers did not drain in time.
    Busy = "busy",
    /// dirty-pages: a different number of dirty pages.
    DirtyCount = "dirty-count",
    /// dirty-pages: no slot in the range logs dirty pages.
    NotLogging = "not-logging",
    /// dirty-pages: the IOMMU's dirty bits could not be read.
    Stage2 = "stage2",
    /// stage2-dump: different runs or bytes mapped.
    Stage2Mismatch = "stage2-mismatch",
    /// check with `pages`: a different number of pinned pages.
    PinnedPages = "pinned-pages",
    /// pin: the pin limit would be exceeded.
    PinLimit = "pin-limit",
    /// pin: the range is empty, unaligned or wraps.
    BadRange = "bad-range",
    /// pin: mlock failed.
    Mlock = "mlock",
    /// pin: a pin of that name is already held.
    DuplicatePin = "duplicate-pin",
    /// unpin: no pin of that name is held.
    NoSuchPin = "no-such-pin",
    /// Guest command: the guest saw a value other than the expected one
    /// (verify, verify-const, read with `value`, dma-checksum with `value`).
    Mismatch = "mismatch",
    /// Guest command: an access exited to the VMM on unplugged memory.
    Unplugged = "unplugged",
    /// Guest command: a write to read-only memory (also pin: the range is read-only).
    ReadOnly = "read-only",
    /// Guest command: the guest took an exception.
    Exception = "exception",
    /// Guest command: the guest refused the command or failed otherwise.
    CommandFailed = "command-failed",
    /// DMA step: the engine faulted (memory not plugged or not writable).
    DmaFault = "dma-fault",
    /// DMA step: the pin limit refused the transfer.
    DmaNoPin = "dma-no-pin",
    /// DMA step: the memory changed under the transfer (its pin was revoked).
    DmaRevoked = "dma-revoked",
    /// DMA step: the engine found the request invalid.
    DmaInvalid = "dma-invalid",
    /// The run stopped (timeout, signal, a vCPU gone) before the step finished.
    Stopped = "stopped",
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
