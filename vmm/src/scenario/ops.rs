//! Memory-op steps: each runs one slot-map op through the memory manager, then
//! the consistency check (incremental, over what the op changed, or
//! periodically full: [`Checker`]), and names any failure by its [`Outcome`]
//! (what a scenario's `expect` compares with). A plug's range is judged
//! before host memory is mapped; `plug-many` is one all-or-nothing op.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::devices::iommu::Iommu;
use crate::mm::addr::{Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::manager::{Applied, Checker, MemoryManager, MemslotError};
use crate::mm::slot_map::{MemslotChange, PlugSpec, SlotFlags, SlotMapError};
use crate::mm::stage2::MappedRun;

use super::expect::Outcome;
use super::pages::{DirtyWant, PageSet};
use super::step::{Access, Action, Stage2Dump};

/// A failed op: its outcome and the full message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFailure {
    /// e.g. overlap, too-many-slots, hole.
    pub kind: Outcome,
    /// The error's own message.
    pub message: String,
}

impl OpFailure {
    fn new(kind: Outcome, message: impl ToString) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }
}

/// The outcome of a slot-map refusal.
pub fn slot_map_kind(e: &SlotMapError) -> Outcome {
    match e {
        SlotMapError::ZeroSize { .. } => Outcome::ZeroSize,
        SlotMapError::RangeOverflow { .. } => Outcome::RangeOverflow,
        SlotMapError::Misaligned { .. } => Outcome::Misaligned,
        SlotMapError::BeyondMaxGpa { .. } => Outcome::BeyondMaxGpa,
        SlotMapError::Overlap { .. } => Outcome::Overlap,
        SlotMapError::MappingTooSmall { .. } => Outcome::MappingTooSmall,
        SlotMapError::HostAliased { .. } => Outcome::HostAliased,
        SlotMapError::TooManySlots { .. } => Outcome::TooManySlots,
        SlotMapError::Reserved { .. } => Outcome::Reserved,
        SlotMapError::ReadOnlyUnsupported { .. } => Outcome::ReadOnlyUnsupported,
        SlotMapError::NothingPlugged { .. } => Outcome::NotPlugged,
        SlotMapError::Hole { .. } => Outcome::Hole,
        SlotMapError::Fixed { .. } => Outcome::Fixed,
        SlotMapError::NoSlotAt { .. } => Outcome::NoSlotAt,
        SlotMapError::DestinationOverlapsSource { .. } => Outcome::DestinationOverlapsSource,
        SlotMapError::NoRoomToGrow { .. } => Outcome::NoRoomToGrow,
        SlotMapError::SlotTooLarge { .. } => Outcome::SlotTooLarge,
        SlotMapError::BatchOverlap { .. } => Outcome::Overlap,
    }
}

fn memslot_failure(e: MemslotError) -> OpFailure {
    match &e {
        MemslotError::SlotMap(inner) => OpFailure::new(slot_map_kind(inner), &e),
        MemslotError::RolledBack { .. } => OpFailure::new(Outcome::KvmRolledBack, &e),
        MemslotError::Vetoed(_) => OpFailure::new(Outcome::Vetoed, &e),
        MemslotError::Guard(_) => OpFailure::new(Outcome::Busy, &e),
        MemslotError::NotLogging { .. } => OpFailure::new(Outcome::NotLogging, &e),
        MemslotError::RangeOverflow { .. } => OpFailure::new(Outcome::RangeOverflow, &e),
        _ => OpFailure::new(Outcome::Kvm, &e),
    }
}

fn parse_flags(names: &[String]) -> Result<SlotFlags, OpFailure> {
    let mut flags = SlotFlags::NONE;
    for n in names {
        match n.as_str() {
            "readonly" | "read-only" => flags.read_only = true,
            "dirty-log" => flags.dirty_log = true,
            other => {
                return Err(OpFailure::new(
                    Outcome::InvalidFlags,
                    format!("unknown slot flag {other:?}: expected \"readonly\" or \"dirty-log\""),
                ))
            }
        }
    }
    Ok(flags)
}

fn backing(name: Option<&str>, default: &BackingKind) -> Result<BackingKind, OpFailure> {
    match name {
        None => Ok(default.clone()),
        Some(b) => b
            .parse()
            .map_err(|e| OpFailure::new(Outcome::UnknownBacking, e)),
    }
}

/// Runs memory op `action`, then checks KVM's memslots against the map
/// whether the op succeeded or was refused (a refused op must change
/// nothing), with the full check. `Ok` carries a short detail for the console.
pub fn run_op(
    memory: &MemoryManager,
    iommu: &Iommu,
    action: &Action,
    default_backing: &BackingKind,
) -> Result<String, OpFailure> {
    run_op_checked(memory, iommu, action, default_backing, &mut Checker::new(1))
}

/// [`run_op`] with the check `checker` chooses: incremental (what the op
/// changed, see [`Checker`]) or, periodically, full; a `check` step is
/// always a full check.
pub fn run_op_checked(
    memory: &MemoryManager,
    iommu: &Iommu,
    action: &Action,
    default_backing: &BackingKind,
    checker: &mut Checker,
) -> Result<String, OpFailure> {
    let mut changes = Changes::default();
    let outcome = apply_op(memory, iommu, action, default_backing, &mut changes);
    let checked = match action {
        Action::Check(_) => checker.full(memory),
        _ => checker
            .after_op(memory, (!changes.unknown).then_some(&changes.made[..]))
            .map(|_| ()),
    };
    checked.map_err(|e| {
        OpFailure::new(
            Outcome::Inconsistent,
            format!("KVM memslots and the slot map differ: {e}"),
        )
    })?;
    outcome
}

/// The memslot changes an op made, for the incremental check.
#[derive(Default)]
struct Changes {
    made: Vec<MemslotChange>,
    /// An op failed after issuing changes (rolled back, or worse).
    unknown: bool,
}

fn apply_op(
    memory: &MemoryManager,
    iommu: &Iommu,
    action: &Action,
    default_backing: &BackingKind,
    changes: &mut Changes,
) -> Result<String, OpFailure> {
    let changes = std::cell::RefCell::new(changes);
    let track = |result: Result<Applied, MemslotError>| {
        let mut c = changes.borrow_mut();
        match &result {
            Ok(applied) => c.made.extend(applied.changes.iter().cloned()),
            Err(MemslotError::SlotMap(_) | MemslotError::Vetoed(_) | MemslotError::Guard(_))
            | Err(MemslotError::NotLogging { .. } | MemslotError::RangeOverflow { .. }) => {}
            Err(_) => c.unknown = true,
        }
        result.map_err(memslot_failure)
    };
    let apply = |op: &dyn Fn(&crate::mm::slot_map::SlotMap) -> Result<_, SlotMapError>| {
        track(memory.apply(|m| op(m)))
    };
    let detail = match action {
        Action::Plug(p) => {
            let (gpa, size) = (Gpa(p.gpa.0), p.size.0);
            let flags = parse_flags(p.flags.as_deref().unwrap_or_default())?;
            // `file` alone: a shared file without a name in the temporary
            // directory (nothing is left behind); `file=PATH` names one.
            let unnamed_file = p.backing.as_deref() == Some("file");
            let kind = if unnamed_file {
                BackingKind::File(std::env::temp_dir())
            } else {
                backing(p.backing.as_deref(), default_backing)?
            };
            // Judge the range before any host memory exists.
            memory
                .load()
                .check_plug(gpa, size, kind.granule(), flags)
                .map_err(|e| OpFailure::new(slot_map_kind(&e), MemslotError::SlotMap(e)))?;
            // Map whole pages (at least one) so the slot map, not mmap, judges
            // the requested size and alignment and names the problem.
            let map_len = size
                .max(1)
                .checked_next_multiple_of(kind.page_size())
                .unwrap_or(size);
            let mapping = if unnamed_file {
                HostMapping::new_unnamed_file(&std::env::temp_dir(), map_len)
            } else {
                HostMapping::new(&kind, map_len)
            };
            let mapping = Arc::new(mapping.map_err(|e| OpFailure::new(Outcome::Backing, e))?);
            apply(&|m| m.plug(gpa, size, mapping.clone(), 0, flags))?;
            format!("{kind} memory plugged")
        }
        Action::Unplug(u) => {
            let a = apply(&|m| m.unplug(Gpa(u.gpa.0), u.size.0))?;
            format!("{} bytes of host memory released", a.discarded)
        }
        Action::Protect(p) => {
            let ro = p.access == Access::Ro;
            apply(&|m| m.protect(Gpa(p.gpa.0), p.size.0, ro))?;
            (if ro {
                "now read-only"
            } else {
                "now read-write"
            })
            .to_string()
        }
        Action::Move(mv) => {
            let to = Gpa(mv.to.0);
            apply(&|m| m.move_range(Gpa(mv.gpa.0), mv.size.0, to))?;
            format!("now at {to}")
        }
        Action::Resize(r) => resize(memory, Gpa(r.gpa.0), r.new_size.0, &track)?,
        Action::DirtyLog(d) => {
            apply(&|m| m.set_dirty_log(Gpa(d.gpa.0), d.size.0, d.on))?;
            (if d.on {
                "dirty logging on"
            } else {
                "dirty logging off"
            })
            .to_string()
        }
        Action::DirtyPages(d) => dirty_pages(
            memory,
            iommu,
            Gpa(d.gpa.0),
            d.size.0,
            d.pages.as_ref(),
            d.maybe_pages.as_ref(),
        )?,
        Action::Stage2Dump(d) => stage2_dump(iommu, d)?,
        Action::PlugMany(p) => plug_many(memory, Gpa(p.gpa.0), p.count.map(|n| n.0), &track)?,
        Action::Check(_) => "consistent".to_string(),
        other => {
            return Err(OpFailure::new(
                Outcome::Stopped,
                format!("{} is not a memory op", other.kind()),
            ))
        }
    };
    Ok(detail)
}

/// KVM's dirty log (vCPU writes) united with the IOMMU's dirty bits (device
/// writes) of `[gpa, gpa + size)`; both are read and cleared. With `want`,
/// the report must have that many pages, or be exactly that set (pages of
/// `maybe` may be reported too: `want ⊆ reported ⊆ want ∪ maybe`).
fn dirty_pages(
    memory: &MemoryManager,
    iommu: &Iommu,
    gpa: Gpa,
    size: u64,
    want: Option<&DirtyWant>,
    maybe: Option<&PageSet>,
) -> Result<String, OpFailure> {
    let kvm = memory.dirty_pages(gpa, size).map_err(memslot_failure)?;
    let range = GpaRange::new(gpa, size).ok_or_else(|| {
        OpFailure::new(
            Outcome::RangeOverflow,
            format!("{gpa} + {size:#x} overflows"),
        )
    })?;
    let device = iommu
        .take_dirty(range)
        .map_err(|e| OpFailure::new(Outcome::Stage2, e))?;
    let pages: BTreeSet<u64> = kvm.iter().chain(device.iter()).map(|g| g.0).collect();
    let detail = format!(
        "{} dirty pages ({} in KVM's log, {} written by devices)",
        pages.len(),
        kvm.len(),
        device.len()
    );
    let verdict = match want {
        None => Ok(()),
        Some(DirtyWant::Count(n)) if pages.len() as u64 == *n => Ok(()),
        Some(DirtyWant::Count(n)) => Err(format!("expected {n}")),
        Some(DirtyWant::Set(set)) => set.judge(maybe.unwrap_or(&PageSet::default()), &pages),
    };
    verdict
        .map(|()| detail.clone())
        .map_err(|why| OpFailure::new(Outcome::DirtyCount, format!("{detail}; {why}")))
}

/// Most runs a `stage2-dump` step lists in its detail.
const DUMP_LINES: usize = 8;

/// The IOMMU table's runs (those overlapping `gpa`/`size` if given, clipped
/// to it), checked against `runs` and `mapped` (bytes) if given.
fn stage2_dump(iommu: &Iommu, step: &Stage2Dump) -> Result<String, OpFailure> {
    let window = match (step.gpa, step.size) {
        (Some(g), Some(s)) => Some(GpaRange::new(Gpa(g.0), s.0).ok_or_else(|| {
            OpFailure::new(
                Outcome::RangeOverflow,
                format!("{:#x} + {:#x} overflows", g.0, s.0),
            )
        })?),
        _ => None,
    };
    let runs: Vec<MappedRun> = iommu
        .dump()
        .into_iter()
        .filter_map(|r| match window {
            None => Some(r),
            Some(w) => r.range.intersect(&w).map(|range| MappedRun {
                range,
                hva: Hva(r.hva.0 + (range.start().0 - r.range.start().0)),
                ..r
            }),
        })
        .collect();
    let mapped: u64 = runs.iter().map(|r| r.range.len()).sum();
    let mut detail = format!("{} runs, {mapped:#x} bytes mapped", runs.len());
    for r in runs.iter().take(DUMP_LINES) {
        detail.push_str(&format!("; {} {} {}", r.range, r.page_size.name(), r.perms));
    }
    if runs.len() > DUMP_LINES {
        detail.push_str(&format!("; ... {} more", runs.len() - DUMP_LINES));
    }
    let runs_ok = step.runs.is_none_or(|n| n == runs.len() as u64);
    let mapped_ok = step.mapped.is_none_or(|n| n.0 == mapped);
    if runs_ok && mapped_ok {
        return Ok(detail);
    }
    let mut want = Vec::new();
    if let Some(n) = step.runs {
        want.push(format!("{n} runs"));
    }
    if let Some(n) = step.mapped {
        want.push(format!("{:#x} bytes mapped", n.0));
    }
    Err(OpFailure::new(
        Outcome::Stage2Mismatch,
        format!("{detail}; expected {}", want.join(", ")),
    ))
}

/// What an op's result goes through: records its changes, names its failure.
type Track<'a> = dyn Fn(Result<Applied, MemslotError>) -> Result<Applied, OpFailure> + 'a;

fn resize(
    memory: &MemoryManager,
    gpa: Gpa,
    new_size: u64,
    track: &Track<'_>,
) -> Result<String, OpFailure> {
    let applied = memory.apply(|m| match m.resize(gpa, new_size, None) {
        Err(e @ SlotMapError::NoRoomToGrow { grow, .. }) => {
            // The mapping's last slot has no room after it in its host
            // mapping: back the added part with a new mapping of that kind
            // (whole host pages; the slot uses its first `grow` bytes). A
            // file-backed mapping grows into a new unnamed file: mapping
            // its own file again would start at offset 0 and alias pages
            // the guest already has.
            let Some(last) = m.mapping_at(gpa).last().copied() else {
                return Err(e);
            };
            let kind = last.mapping().kind();
            let len = grow.checked_next_multiple_of(kind.page_size());
            let mapping = len
                .and_then(|len| match kind {
                    BackingKind::File(_) => {
                        HostMapping::new_unnamed_file(&std::env::temp_dir(), len).ok()
                    }
                    _ => HostMapping::new(kind, len).ok(),
                })
                .ok_or(e)?;
            m.resize(gpa, new_size, Some(Arc::new(mapping)))
        }
        other => other,
    });
    track(applied)?;
    let bytes = memory
        .load()
        .mapping_at(gpa)
        .iter()
        .map(|s| s.range().len())
        .sum::<u64>();
    Ok(format!("mapping at {gpa} is now {bytes:#x} bytes"))
}

/// Plugs `count` 4 KiB slots (default: until the slot budget is full) at
/// `base`, `base + 8 KiB`, ... (a hole between them so they do not merge),
/// all windows of one host mapping, in one transition: all or nothing. A
/// count above the free slots, or a range the slot map refuses, is refused
/// before any memory is allocated.
fn plug_many(
    memory: &MemoryManager,
    base: Gpa,
    count: Option<u64>,
    track: &Track<'_>,
) -> Result<String, OpFailure> {
    let map = memory.load();
    let max = u64::from(map.config().max_slots);
    let free = max.saturating_sub(map.len() as u64);
    let count = count.unwrap_or(free);
    if count == 0 {
        return Ok("no slot to plug".into());
    }
    if count > free {
        return Err(OpFailure::new(
            Outcome::TooManySlots,
            format!("{count} slots asked, {free} of the VM's {max} slots are free"),
        ));
    }
    let at = |i: u64| {
        i.checked_mul(2 * PAGE_SIZE)
            .and_then(|d| base.0.checked_add(d))
            .map(Gpa)
    };
    if crate::mutants::on("plug-many-partial") {
        return plug_many_one_by_one(memory, count, at, track);
    }
    let mut gpas = Vec::with_capacity(count as usize);
    for i in 0..count {
        let refused = |e: SlotMapError| {
            OpFailure::new(
                slot_map_kind(&e),
                format!("slot {} of {count}: {}", i + 1, MemslotError::SlotMap(e)),
            )
        };
        let gpa = at(i).ok_or_else(|| {
            refused(SlotMapError::RangeOverflow {
                op: "plug",
                gpa: base,
                size: (i + 1) * 2 * PAGE_SIZE,
            })
        })?;
        map.check_plug(gpa, PAGE_SIZE, PAGE_SIZE, SlotFlags::NONE)
            .map_err(refused)?;
        gpas.push(gpa);
    }
    let mapping = Arc::new(
        HostMapping::new(&BackingKind::Anon, count * PAGE_SIZE)
            .map_err(|e| OpFailure::new(Outcome::Backing, e))?,
    );
    let plugs: Vec<PlugSpec> = gpas
        .iter()
        .zip(0..)
        .map(|(&gpa, i)| PlugSpec {
            gpa,
            size: PAGE_SIZE,
            mapping: mapping.clone(),
            offset: i * PAGE_SIZE,
            flags: SlotFlags::NONE,
        })
        .collect();
    track(memory.apply(move |m| m.plug_many(plugs)))?;
    Ok(format!(
        "{count} slots plugged; {} slots in the map",
        memory.load().len()
    ))
}

/// The planted `plug-many-partial` bug: one op per slot, so a refusal at
/// slot k leaves slots 1..k plugged.
fn plug_many_one_by_one(
    memory: &MemoryManager,
    count: u64,
    at: impl Fn(u64) -> Option<Gpa>,
    track: &Track<'_>,
) -> Result<String, OpFailure> {
    for i in 0..count {
        let gpa = at(i).ok_or_else(|| OpFailure::new(Outcome::RangeOverflow, "wraps"))?;
        let mapping = Arc::new(
            HostMapping::new(&BackingKind::Anon, PAGE_SIZE)
                .map_err(|e| OpFailure::new(Outcome::Backing, e))?,
        );
        track(memory.apply(move |m| m.plug(gpa, PAGE_SIZE, mapping, 0, SlotFlags::NONE)))?;
    }
    Ok(format!("{count} slots plugged"))
}
