//! One step of a scenario, typed: [`Step`] is an [`Action`] (one variant per
//! `do = ...` kind, with exactly that kind's fields), its [`Expect`]ation and
//! a note. Steps read from TOML tables (a field that does not apply to the
//! kind is refused, with its position) and write back to the same TOML.
//!
//! ```
//! use vmm::scenario::step::{Action, Step};
//! use vmm::scenario::num::Num;
//! let step = Step::parse_toml("do = \"unplug\"\ngpa = \"0x1_0000_0000\"\nsize = \"2M\"").unwrap();
//! let Action::Unplug(u) = &step.action else { panic!("an unplug") };
//! assert_eq!((u.gpa, u.size), (Num(0x1_0000_0000), Num(2 << 20)));
//! // Written back, it reads as the same step.
//! assert_eq!(Step::parse_toml(&step.to_toml()).unwrap(), step);
//! // A field of another kind is refused, naming it.
//! let e = Step::parse_toml("do = \"unplug\"\ngpa = 0\nsize = 4096\naccess = \"ro\"").unwrap_err();
//! assert_eq!(e.field.as_deref(), Some("access"));
//! ```
//!
//! Steps built in code (a library user, a generator) write the same TOML:
//!
//! ```
//! use vmm::scenario::num::Num;
//! use vmm::scenario::step::{Action, Guest, Read, Step};
//! use vmm::scenario::{Expect, Outcome};
//! let step = Step {
//!     action: Action::Read(Guest {
//!         vcpu: 1,
//!         repeat: 1,
//!         is_async: false,
//!         command: Read { gpa: Num(0x2_0000_0000), value: None },
//!     }),
//!     expect: Expect::AnyOf(vec![Outcome::Unplugged]),
//!     note: None,
//! };
//! assert_eq!(
//!     step.to_toml(),
//!     "do = \"read\"\nvcpu = 1\ngpa = \"0x200000000\"\nexpect = \"unplugged\"\n"
//! );
//! assert_eq!(Step::parse_toml(&step.to_toml()), Ok(step));
//! ```

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::expect::{Expect, Outcome};
use super::num::{DurationText, Num};

/// Most times a guest step may repeat its command (`repeat`).
pub const MAX_REPEAT: u64 = 1_000_000;

/// Most slots a `plug-many` may ask for: KVM's memslot budget on x86
/// (32,764). The run also refuses a count above the VM's free slots.
pub const MAX_SLOTS: u64 = 32_764;

/// A step: what to do, what must happen, and a note for the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// What to do (`do = ...` and its fields).
    #[serde(flatten)]
    pub action: Action,
    /// What must happen (default `"ok"`).
    #[serde(skip_serializing_if = "Expect::is_ok")]
    pub expect: Expect,
    /// Free text shown with the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a step does: one variant per `do = ...` kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
pub enum Action {
    /// Hotplug new memory.
    Plug(Plug),
    /// Remove a range (splitting slots at its edges).
    Unplug(Unplug),
    /// Change a range's access.
    Protect(Protect),
    /// Move a range; the same host memory appears at `to`.
    Move(Move),
    /// Grow or shrink the slot starting at `gpa`.
    Resize(Resize),
    /// Dirty logging on or off for a range.
    DirtyLog(DirtyLog),
    /// Read and clear the dirty pages of a range.
    DirtyPages(DirtyPages),
    /// List the IOMMU's stage-2 table.
    Stage2Dump(Stage2Dump),
    /// Plug many 4 KiB slots.
    PlugMany(PlugMany),
    /// The consistency check only (and the pinned-page count).
    Check(Check),
    /// Pin guest memory as a device would for DMA.
    Pin(Pin),
    /// Release a pin.
    Unpin(Unpin),
    /// Guest: write a pattern.
    Fill(Guest<Fill>),
    /// Guest: check a pattern.
    Verify(Guest<Verify>),
    /// Guest: check every word equals a value.
    VerifyConst(Guest<VerifyConst>),
    /// Guest: one access per stride.
    Touch(Guest<Touch>),
    /// Guest: read 8 bytes.
    Read(Guest<Read>),
    /// Guest: write 8 bytes.
    Write(Guest<Write>),
    /// Guest: busy loop.
    Spin(Guest<Spin>),
    /// Guest: a DMA copy.
    DmaCopy(Guest<DmaCopy>),
    /// Guest: a DMA fill.
    DmaFill(Guest<DmaFill>),
    /// Guest: a DMA checksum.
    DmaChecksum(Guest<DmaChecksum>),
    /// Collect a vCPU's async outcomes.
    Wait(Wait),
    /// Pause the timeline.
    Sleep(Sleep),
}

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? })*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $name {
                $($(#[$fdoc])* pub $field: $ty,)*
            }
        )*
    };
}

fields! {
    /// `plug`: hotplug `[gpa, gpa + size)`.
    Plug {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// Backing kind (default: the scenario's); checked when the step runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backing: Option<String>,
        /// Slot flags (`"readonly"`, `"dirty-log"`); checked when the step runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flags: Option<Vec<String>>,
    }
    /// `unplug`: the range disappears.
    Unplug {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
    }
    /// `protect`: change a range's access.
    Protect {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// The new access.
        access: Access,
    }
    /// `move`: the range's memory appears at `to`.
    Move {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// The new start.
        to: Num,
    }
    /// `resize`: the slot starting at `gpa` gets `new_size` bytes.
    Resize {
        /// A slot's start.
        gpa: Num,
        /// Its new length.
        new_size: Num,
    }
    /// `dirty-log`: logging on or off.
    DirtyLog {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// On or off.
        on: bool,
    }
    /// `dirty-pages`: KVM's log united with the IOMMU's dirty bits.
    DirtyPages {
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// The expected dirty pages: a count (`pages = 3`) or exactly
        /// which, as page runs (`pages = ["0x100000000+3"]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pages: Option<super::pages::DirtyWant>,
        /// With a set `pages`: pages that may be reported too.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maybe_pages: Option<super::pages::PageSet>,
    }
    /// `stage2-dump`: the IOMMU table's runs, in a window if given.
    Stage2Dump {
        /// Window start (with `size`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpa: Option<Num>,
        /// Window length (with `gpa`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<Num>,
        /// The expected number of runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runs: Option<u64>,
        /// The expected bytes mapped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapped: Option<Num>,
    }
    /// `plug-many`: 4 KiB slots 8 KiB apart from `gpa`.
    PlugMany {
        /// The first slot.
        gpa: Num,
        /// How many (default: until the slot budget is full).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<Num>,
    }
    /// `check`: the consistency check.
    Check {
        /// The expected number of pinned pages.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pages: Option<u64>,
    }
    /// `pin`: a named pin the scenario holds until `unpin`.
    Pin {
        /// The pin's name.
        name: String,
        /// Start.
        gpa: Num,
        /// Length in bytes.
        size: Num,
        /// Whether a memory change may revoke it (default true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revocable: Option<bool>,
        /// Pin for writing (default true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        write: Option<bool>,
    }
    /// `unpin`: release a named pin.
    Unpin {
        /// The pin's name.
        name: String,
    }
    /// `fill`: write the pattern of `seed`.
    Fill {
        /// Start (8-byte aligned).
        gpa: Num,
        /// Length (a non-zero multiple of 8).
        size: Num,
        /// Pattern seed.
        seed: Num,
        /// Lay the pattern out as a fill at this address would.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<Num>,
    }
    /// `verify`: check the pattern of `seed`.
    Verify {
        /// Start (8-byte aligned).
        gpa: Num,
        /// Length (a non-zero multiple of 8).
        size: Num,
        /// Pattern seed.
        seed: Num,
        /// The pattern as filled at this address (memory moved from there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<Num>,
    }
    /// `verify-const`: every 8-byte word equals `value`.
    VerifyConst {
        /// Start (8-byte aligned).
        gpa: Num,
        /// Length (a non-zero multiple of 8).
        size: Num,
        /// The value.
        value: Num,
    }
    /// `touch`: one access per stride.
    Touch {
        /// Start.
        gpa: Num,
        /// Length.
        size: Num,
        /// Bytes between accesses (default 4096).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<Num>,
        /// Write instead of read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        write: Option<bool>,
    }
    /// `read`: read 8 bytes.
    Read {
        /// Address.
        gpa: Num,
        /// The value it must hold.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<Num>,
    }
    /// `write`: write 8 bytes.
    Write {
        /// Address.
        gpa: Num,
        /// The value.
        value: Num,
    }
    /// `spin`: busy loop.
    Spin {
        /// Iterations.
        iterations: Num,
    }
    /// `dma-copy`: copy `size` bytes from `gpa` to `to`.
    DmaCopy {
        /// Source.
        gpa: Num,
        /// Destination.
        to: Num,
        /// Length.
        size: Num,
    }
    /// `dma-fill`: fill with an 8-byte value.
    DmaFill {
        /// Start.
        gpa: Num,
        /// Length.
        size: Num,
        /// The value.
        value: Num,
    }
    /// `dma-checksum`: the wrapping sum of the words.
    DmaChecksum {
        /// Start.
        gpa: Num,
        /// Length.
        size: Num,
        /// The sum it must have.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<Num>,
    }
    /// `wait`: collect a vCPU's async outcomes; with `completed`, only
    /// wait until that many of its async commands have finished.
    Wait {
        /// The vCPU (default 0).
        #[serde(default)]
        vcpu: u64,
        /// Wait only until this many of the vCPU's async commands have
        /// finished (at most the async step's `repeat`), collecting
        /// nothing: the rest run on, and a later plain `wait` collects
        /// them. A command that ends the batch early (an outcome its
        /// expectation refuses) fails the wait.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        completed: Option<u64>,
        /// With `completed`: how long to wait at most (default
        /// [`DEFAULT_WITHIN`]); past it the step fails, naming the async
        /// step and how many of its commands had finished.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within: Option<DurationText>,
    }
    /// `sleep`: pause the timeline.
    Sleep {
        /// How long (`"10ms"`).
        duration: DurationText,
    }
}

/// How long a `wait` with `completed` waits when it gives no `within`.
pub const DEFAULT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

impl Wait {
    /// A plain `wait`: collect every async outcome of `vcpu`.
    pub fn collect(vcpu: u64) -> Wait {
        Wait {
            vcpu,
            completed: None,
            within: None,
        }
    }
}

/// `protect`'s access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read-only.
    Ro,
    /// Read-write.
    Rw,
}

/// A guest command with the fields every guest command has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guest<C> {
    /// Which vCPU runs it (default 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub vcpu: u64,
    /// How many times (default 1, at most [`MAX_REPEAT`]).
    #[serde(skip_serializing_if = "is_one")]
    pub repeat: u64,
    /// Don't wait: a later `wait` collects the outcomes.
    #[serde(rename = "async", skip_serializing_if = "is_false")]
    pub is_async: bool,
    /// The command.
    #[serde(flatten)]
    pub command: C,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_one(v: &u64) -> bool {
    *v == 1
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// Why a step cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", field.as_ref().map(|f| format!("`{f}`: ")).unwrap_or_default())]
pub struct StepError {
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// Byte offsets in the text read (the field's, else the step's).
    pub span: Option<Range<usize>>,
    /// What is wrong.
    pub problem: String,
}

impl Step {
    /// The `do = ...` name of the step.
    pub fn kind(&self) -> &'static str {
        self.action.kind()
    }

    /// The step as a TOML table's body; [`Step::parse_toml`] reads it back
    /// as the same step.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot write step: {e}"))
    }
}

/// The `do` names, in the README's order.
pub const KINDS: [&str; 24] = [
    "plug",
    "unplug",
    "protect",
    "move",
    "resize",
    "dirty-log",
    "dirty-pages",
    "stage2-dump",
    "plug-many",
    "check",
    "pin",
    "unpin",
    "fill",
    "verify",
    "verify-const",
    "touch",
    "read",
    "write",
    "spin",
    "dma-copy",
    "dma-fill",
    "dma-checksum",
    "wait",
    "sleep",
];

impl Action {
    /// The `do = ...` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Plug(_) => "plug",
            Action::Unplug(_) => "unplug",
            Action::Protect(_) => "protect",
            Action::Move(_) => "move",
            Action::Resize(_) => "resize",
            Action::DirtyLog(_) => "dirty-log",
            Action::DirtyPages(_) => "dirty-pages",
            Action::Stage2Dump(_) => "stage2-dump",
            Action::PlugMany(_) => "plug-many",
            Action::Check(_) => "check",
            Action::Pin(_) => "pin",
            Action::Unpin(_) => "unpin",
            Action::Fill(_) => "fill",
            Action::Verify(_) => "verify",
            Action::VerifyConst(_) => "verify-const",
            Action::Touch(_) => "touch",
            Action::Read(_) => "read",
            Action::Write(_) => "write",
            Action::Spin(_) => "spin",
            Action::DmaCopy(_) => "dma-copy",
            Action::DmaFill(_) => "dma-fill",
            Action::DmaChecksum(_) => "dma-checksum",
            Action::Wait(_) => "wait",
            Action::Sleep(_) => "sleep",
        }
    }

    /// For a guest command: (vCPU, repeat, async).
    pub fn guest(&self) -> Option<(u64, u64, bool)> {
        fn g<C>(g: &Guest<C>) -> Option<(u64, u64, bool)> {
            Some((g.vcpu, g.repeat, g.is_async))
        }
        match self {
            Action::Fill(x) => g(x),
            Action::Verify(x) => g(x),
            Action::VerifyConst(x) => g(x),
            Action::Touch(x) => g(x),
            Action::Read(x) => g(x),
            Action::Write(x) => g(x),
            Action::Spin(x) => g(x),
            Action::DmaCopy(x) => g(x),
            Action::DmaFill(x) => g(x),
            Action::DmaChecksum(x) => g(x),
            _ => None,
        }
    }

    /// The vCPU a guest command or `wait` is for.
    pub fn vcpu(&self) -> Option<u64> {
        match self {
            Action::Wait(w) => Some(w.vcpu),
            a => a.guest().map(|(vcpu, _, _)| vcpu),
        }
    }

    /// Whether a step of this kind can end with `outcome` (the README's
    /// table of outcomes). Every step can end `ok` or `stopped`.
    pub fn can_end_with(&self, outcome: Outcome) -> bool {
        use Outcome as O;
        let slot_map = matches!(
            outcome,
            O::Overlap
                | O::Misaligned
                | O::ZeroSize
                | O::BeyondMaxGpa
                | O::RangeOverflow
                | O::TooManySlots
                | O::NotPlugged
                | O::Hole
                | O::Fixed
                | O::NoSlotAt
                | O::DestinationOverlapsSource
                | O::NoRoomToGrow
                | O::SlotTooLarge
                | O::MappingTooSmall
                | O::HostAliased
                | O::ReadOnlyUnsupported
                | O::Reserved
                | O::Kvm
                | O::KvmRolledBack
                | O::Vetoed
                | O::Busy
                | O::Inconsistent
        );
        let guest = matches!(
            outcome,
            O::Mismatch | O::Unplugged | O::ReadOnly | O::Exception | O::CommandFailed
        );
        let dma = matches!(
            outcome,
            O::DmaFault | O::DmaNoPin | O::DmaRevoked | O::DmaInvalid
        );
        matches!(outcome, O::Ok | O::Stopped)
            || match self {
                Action::Plug(_) => {
                    slot_map || matches!(outcome, O::InvalidFlags | O::UnknownBacking | O::Backing)
                }
                Action::PlugMany(_) => slot_map || outcome == O::Backing,
                Action::DirtyPages(_) => {
                    slot_map || matches!(outcome, O::DirtyCount | O::Stage2 | O::NotLogging)
                }
                Action::Unplug(_)
                | Action::Protect(_)
                | Action::Move(_)
                | Action::Resize(_)
                | Action::DirtyLog(_) => slot_map,
                Action::Stage2Dump(_) => matches!(
                    outcome,
                    O::RangeOverflow | O::Stage2Mismatch | O::Inconsistent
                ),
                Action::Check(_) => matches!(outcome, O::PinnedPages | O::Inconsistent),
                Action::Pin(_) => matches!(
                    outcome,
                    O::NotPlugged
                        | O::ReadOnly
                        | O::PinLimit
                        | O::BadRange
                        | O::Mlock
                        | O::Busy
                        | O::DuplicatePin
                ),
                Action::Unpin(_) => outcome == O::NoSuchPin,
                Action::DmaCopy(_) | Action::DmaFill(_) | Action::DmaChecksum(_) => dma || guest,
                Action::Fill(_)
                | Action::Verify(_)
                | Action::VerifyConst(_)
                | Action::Touch(_)
                | Action::Read(_)
                | Action::Write(_)
                | Action::Spin(_) => guest,
                Action::Wait(_) | Action::Sleep(_) => false,
            }
    }

    /// Checks the values that need no VM: guest ranges (aligned, non-empty,
    /// not wrapping), `stride`, `repeat`, `count`. The error names the field
    /// at fault (its span is left to the reader of the text).
    pub fn check(&self) -> Result<(), StepError> {
        if let Some((_, repeat, _)) = self.guest() {
            if repeat == 0 {
                return Err(bad("repeat", "must be at least 1"));
            }
            if repeat > MAX_REPEAT {
                return Err(bad(
                    "repeat",
                    format!("{repeat} is above the maximum of {MAX_REPEAT}"),
                ));
            }
        }
        match self {
            Action::Fill(Guest {
                command: Fill { gpa, size, .. },
                ..
            })
            | Action::Verify(Guest {
                command: Verify { gpa, size, .. },
                ..
            })
            | Action::VerifyConst(Guest {
                command: VerifyConst { gpa, size, .. },
                ..
            }) => words(*gpa, *size),
            Action::Touch(Guest { command: t, .. }) => {
                if t.stride == Some(Num(0)) {
                    return Err(bad("stride", "must be at least 1"));
                }
                span("size", t.gpa, t.size)
            }
            Action::Read(Guest { command: r, .. }) => span("gpa", r.gpa, Num(8)),
            Action::Write(Guest { command: w, .. }) => span("gpa", w.gpa, Num(8)),
            Action::DmaCopy(Guest { command: c, .. }) => {
                span("size", c.gpa, c.size)?;
                span("to", c.to, c.size)
            }
            Action::DmaFill(Guest { command: c, .. }) => span("size", c.gpa, c.size),
            Action::DmaChecksum(Guest { command: c, .. }) => span("size", c.gpa, c.size),
            Action::PlugMany(PlugMany {
                count: Some(Num(n)),
                ..
            }) if *n > MAX_SLOTS => Err(bad(
                "count",
                format!("{n} is above the slot budget of {MAX_SLOTS}"),
            )),
            Action::Stage2Dump(d) => match (d.gpa, d.size) {
                (Some(_), None) => Err(bad("gpa", TOGETHER)),
                (None, Some(_)) => Err(bad("size", TOGETHER)),
                _ => Ok(()),
            },
            Action::Wait(Wait {
                completed: Some(0), ..
            }) => Err(bad("completed", "must be at least 1")),
            Action::Wait(Wait {
                completed: Some(n), ..
            }) if *n > MAX_REPEAT => Err(bad(
                "completed",
                format!("{n} is above the most commands a step runs ({MAX_REPEAT})"),
            )),
            Action::Wait(Wait {
                completed: None,
                within: Some(_),
                ..
            }) => Err(bad(
                "within",
                "goes with `completed` (a plain `wait` collects every outcome, however long)",
            )),
            Action::DirtyPages(DirtyPages {
                pages: Some(super::pages::DirtyWant::Count(_)) | None,
                maybe_pages: Some(_),
                ..
            }) => Err(bad(
                "maybe_pages",
                "goes with `pages` as a list of page runs, not a count",
            )),
            _ => Ok(()),
        }
    }
}

const TOGETHER: &str = "`gpa` and `size` go together (the window to list)";

fn bad(field: &str, problem: impl ToString) -> StepError {
    StepError {
        field: Some(field.into()),
        span: None,
        problem: problem.to_string(),
    }
}

/// A guest range of whole 8-byte words.
fn words(gpa: Num, size: Num) -> Result<(), StepError> {
    if gpa.0 % 8 != 0 {
        return Err(bad("gpa", format!("{gpa} is not 8-byte aligned")));
    }
    if size.0 == 0 || size.0 % 8 != 0 {
        return Err(bad(
            "size",
            format!("{size} is not a non-zero multiple of 8"),
        ));
    }
    span("size", gpa, size)
}

/// A non-empty range that does not wrap past the end of the address space.
fn span(field: &'static str, gpa: Num, size: Num) -> Result<(), StepError> {
    if size.0 == 0 {
        return Err(bad(field, "the range is empty"));
    }
    if gpa.0.checked_add(size.0).is_none() {
        return Err(bad(
            field,
            format!("{gpa} + {size} wraps past the end of the address space"),
        ));
    }
    Ok(())
}
