//! The pure tier: a timeline's memory ops, pins, simulated guest writes and
//! DMA transfers ([`super::sim_dma`]) on the memory manager over [`SimKvm`]
//! (no vCPUs, no `/dev/kvm`), each outcome compared with the model's, after
//! every memory op the check of the memslots it changed
//! ([`MemoryManager::check_changes`]), and after every step the invariants
//! the library exposes: the
//! map's expected memslots equal the manager's mirror and the simulated
//! memslots equal the mirror (no leaked slot id), the hub's plugged set
//! equals the map's slots merged, the pin account equals the model's live
//! pins, and the map's slots equal the model's (range, access, dirty
//! logging, chains), the IOMMU's leaves lie inside plugged slots with the
//! slot's host address and no wider access (a simulated device reads
//! sampled pages through the IOMMU so ops have leaves to zap), and every
//! `probe_every` steps KVM is probed by GPA
//! ([`crate::scenario::invariants`]). At `check` steps and at the end also the full
//! consistency check and the locked pages of live pins. Options
//! ([`SimOptions`]): failing memslot changes, and a device thread holding a
//! guard across every op ([`GuardReader`]). [`run_reusing`] keeps one VM per
//! thread and [resets](SimVm::reset) it between timelines.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::devices::iommu::Iommu;
use crate::devices::pins::{Pin, PinManager};
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE as PAGE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::manager::{Checker, MemoryManager, SimKvm, SimWrite};
use crate::mm::pin_account::{PinAccount, PinLimit};
use crate::mm::slot_map::{SlotFlags, SlotMapConfig};
use crate::scenario::ops::run_op_checked;
use crate::scenario::step::Action;
use crate::scenario::Outcome;

use super::finding::Finding;
use super::model::{Layout, Model};
use super::reader::GuardReader;
use crate::scenario::invariants::{self, StepInvariants, DEFAULT_PROBE_EVERY};

mod reset;

use reset::BootState;

/// Pages the simulated device reads through the IOMMU after each step.
const DEVICE_READS_PER_STEP: u32 = 2;

/// Steps between two full walks of the IOMMU's table (between them, the
/// leaves of the pages the device read lately are checked).
const IOMMU_WALK_EVERY: u64 = 32;

/// Entries of each simulated dirty ring in ring mode.
const SIM_FUZZ_RING_ENTRIES: usize = 32;

/// Why the simulated VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The manager or its first slots.
    #[error("building the simulated VM: {0}")]
    Setup(String),
}

/// A memory manager on [`SimKvm`] shaped like `layout`, with its IOMMU,
/// pin manager and held pins.
#[allow(missing_debug_implementations)]
pub struct SimVm {
    kvm: Arc<SimKvm>,
    memory: Arc<MemoryManager>,
    iommu: Arc<Iommu>,
    pins: Arc<PinManager>,
    held: BTreeMap<String, Pin>,
    /// Whether [`check`](Self::check) checks that live pins' pages are
    /// mlocked (on unless a [`SimOptions`] says otherwise).
    pub locked_pages: bool,
    /// The consistency check after each memory op.
    checker: Checker,
    /// The layout the VM was built for.
    layout: Layout,
    /// Guest RAM's host mapping, plugged again by [`reset`](Self::reset).
    ram: Arc<HostMapping>,
    /// What the VM looked like when built, for [`reset`](Self::reset) to
    /// compare with.
    boot: BootState,
    /// The IOMMU-leaf invariant and KVM probes ([`StepInvariants`]).
    step_invariants: std::sync::Mutex<StepInvariants>,
}

impl SimVm {
    /// The VM as the model starts it: the fixed boot region and guest RAM.
    pub fn new(layout: &Layout) -> Result<Self, SimError> {
        let err = |e: &dyn std::fmt::Display| SimError::Setup(e.to_string());
        let l = &layout.limits;
        // Small rings, so ring-full exits happen within a timeline.
        let kvm = Arc::new(
            SimKvm::with_max_slots(l.max_slots as u32)
                .with_dirty_log(layout.dirty_log)
                .with_rings(layout.vcpus as usize, SIM_FUZZ_RING_ENTRIES),
        );
        let config = SlotMapConfig {
            max_slots: l.max_slots as u32,
            max_gpa: Gpa(l.max_gpa),
            read_only_supported: l.read_only,
            reserved: GpaRange::new(Gpa(l.reserved.0), l.reserved.1 - l.reserved.0),
            ..SlotMapConfig::default()
        };
        let memory = Arc::new(MemoryManager::new(kvm.clone(), config).map_err(|e| err(&e))?);
        let mut ram = None;
        for (start, len, fixed) in [
            (0, layout.boot_end, true),
            (layout.ram.0, layout.ram.1, false),
        ] {
            let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, len).map_err(|e| err(&e))?);
            let flags = SlotFlags {
                fixed,
                ..SlotFlags::NONE
            };
            memory
                .apply(|m| m.plug(Gpa(start), len, mapping.clone(), 0, flags))
                .map_err(|e| err(&e))?;
            ram = Some(mapping);
        }
        let mut vm = Self {
            iommu: Arc::new(Iommu::new(memory.clone())),
            pins: Arc::new(Self::pin_manager(&memory, layout)),
            kvm,
            memory,
            held: BTreeMap::new(),
            locked_pages: true,
            checker: Self::checker(),
            layout: layout.clone(),
            ram: ram.expect("guest RAM was plugged"),
            boot: BootState {
                kvm: Vec::new(),
                registered: Vec::new(),
                slots: Vec::new(),
                chained: Vec::new(),
                plugged: Vec::new(),
                dirty_backlog: (0, 0, 0),
                charged: (0, 0),
                stage2: Vec::new(),
            },
            step_invariants: std::sync::Mutex::new(Self::step_invariants()),
        };
        vm.boot = vm.state();
        Ok(vm)
    }

    /// A pin manager with a new account of `layout`'s pin limit.
    fn pin_manager(memory: &Arc<MemoryManager>, layout: &Layout) -> PinManager {
        let account = Arc::new(PinAccount::new(PinLimit::Pages(layout.pin_limit)));
        PinManager::new(memory.clone(), account)
    }

    /// The layout the VM was built for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The check after each memory op: what the op changed
    /// ([`MemoryManager::check_changes`]); [`check`](Self::check) compares
    /// every memslot after every step and runs the full check at `check`
    /// steps and at the end.
    fn checker() -> Checker {
        Checker::new(u32::MAX).with_sweep(std::time::Duration::ZERO)
    }

    /// The IOMMU-leaf invariant and the KVM probes as a new VM starts them.
    fn step_invariants() -> StepInvariants {
        StepInvariants::default().walking_every(IOMMU_WALK_EVERY)
    }

    /// Makes the memslot change `offset` calls from now fail with `errno`
    /// (see [`SimKvm::fail_calls`]).
    pub fn inject_failure(&self, offset: usize, errno: i32) {
        self.kvm.fail_calls(&[offset], errno);
    }

    /// Runs one step; its outcome and detail.
    pub fn step(&mut self, action: &Action) -> (Outcome, String) {
        match action {
            // The driver's pin step, mirrored (its duplicate-name mutant too).
            Action::Pin(p)
                if self.held.contains_key(&p.name) && !crate::mutants::on("duplicate-pin-ok") =>
            {
                (
                    Outcome::DuplicatePin,
                    format!("a pin named {:?} is already held", p.name),
                )
            }
            Action::Pin(p) => {
                let revocable = p.revocable.unwrap_or(true);
                match self
                    .pins
                    .pin(Gpa(p.gpa.0), p.size.0, p.write.unwrap_or(true), revocable)
                {
                    Ok(pin) => {
                        self.held.insert(p.name.clone(), pin);
                        (Outcome::Ok, "pinned".into())
                    }
                    Err(e) => (Outcome::from(&e), e.to_string()),
                }
            }
            Action::Unpin(u) => match self.held.remove(&u.name) {
                Some(_) => (Outcome::Ok, "unpinned".into()),
                None => (Outcome::NoSuchPin, format!("no pin named {:?}", u.name)),
            },
            Action::Check(c) => {
                let now = self.pins.account().pinned().charged();
                match c.pages {
                    Some(want) if want != now => (
                        Outcome::PinnedPages,
                        format!("{now} pages pinned, expected {want}"),
                    ),
                    _ => (Outcome::Ok, "consistent".into()),
                }
            }
            Action::Fill(g) => self.guest_writes(g.command.gpa.0, g.command.size.0, PAGE),
            Action::Write(g) => self.guest_writes(g.command.gpa.0, 8, PAGE),
            Action::Touch(g) if g.command.write == Some(true) => {
                let stride = g.command.stride.map_or(PAGE, |s| s.0);
                self.guest_writes(g.command.gpa.0, g.command.size.0, stride)
            }
            a @ (Action::DmaFill(_) | Action::DmaCopy(_) | Action::DmaChecksum(_)) => {
                super::sim_dma::step(&self.memory, &self.pins, &self.iommu, a)
                    .unwrap_or((Outcome::Ok, String::new()))
            }
            a if a.guest().is_some() || matches!(a, Action::Wait(_) | Action::Sleep(_)) => {
                (Outcome::Ok, "skipped: no vCPUs in the sim tier".into())
            }
            a => match run_op_checked(
                &self.memory,
                &self.iommu,
                a,
                &BackingKind::Anon,
                &mut self.checker,
            ) {
                Ok(d) => (Outcome::Ok, d),
                Err(f) => (f.kind, f.message),
            },
        }
    }

    /// One guest write as a vCPU makes it: a full dirty ring is harvested
    /// and the write retried, as the vCPU loop does on
    /// `KVM_EXIT_DIRTY_RING_FULL`. `false` if the write exits.
    fn guest_write(&self, gpa: Gpa) -> bool {
        loop {
            match self.kvm.guest_write_on(0, gpa) {
                SimWrite::Written => return true,
                SimWrite::Exit => return false,
                SimWrite::RingFull => {
                    if self.memory.harvest_dirty_rings().is_err() {
                        return false;
                    }
                }
            }
        }
    }

    /// Guest writes at `gpa`, `gpa + stride`, ... below `gpa + size`, as
    /// KVM's fault path sees them ([`SimKvm::guest_write`]: logged if the
    /// slot logs); the first that would exit ends the command.
    fn guest_writes(&self, gpa: u64, size: u64, stride: u64) -> (Outcome, String) {
        let end = gpa.saturating_add(size);
        let mut at = gpa;
        let mut last_page = None;
        while at < end {
            let page = at - at % PAGE;
            if last_page != Some(page) && !self.guest_write(Gpa(page)) {
                return match self.memory.load().lookup(Gpa(page)) {
                    None => (Outcome::Unplugged, format!("write to unplugged {page:#x}")),
                    Some(s) if s.flags().read_only => {
                        (Outcome::ReadOnly, format!("write to read-only {page:#x}"))
                    }
                    Some(_) => (
                        Outcome::CommandFailed,
                        format!("KVM has no writable memslot at {page:#x} but the map has a slot"),
                    ),
                };
            }
            last_page = Some(page);
            at = match at.checked_add(stride.max(1)) {
                Some(n) => n,
                None => break,
            };
        }
        (Outcome::Ok, "written".into())
    }

    /// Every page of every live pin is mlocked (a pin keeps its host pages
    /// resident however many other pins share them).
    fn check_locked(&self) -> Result<(), (&'static str, String)> {
        let live: Vec<&Pin> = self.held.values().filter(|p| !p.is_revoked()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let locked = super::locked::locked_ranges()
            .map_err(|e| ("locked", format!("reading /proc/self/smaps: {e}")))?;
        let map = self.memory.load();
        for pin in live {
            let r = pin.range();
            let mut gpa = r.start().0;
            while gpa < r.end().0 {
                if let Some((hva, _)) = map.translate(Gpa(gpa)) {
                    let page = hva.0 - hva.0 % PAGE;
                    if !super::locked::is_locked(&locked, page) {
                        return Err((
                            "locked",
                            format!(
                                "page {gpa:#x} (host {page:#x}) of live pin {} over {r} is not mlocked",
                                pin.id()
                            ),
                        ));
                    }
                }
                gpa += PAGE;
            }
        }
        Ok(())
    }

    /// Probes KVM every `every` steps (0: never; see [`StepInvariants`]).
    pub fn set_probe_every(&self, every: u32) {
        self.step_invariants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .probe_every = every;
    }

    /// The IOMMU's leaves against the map, sampled KVM probes, then device
    /// reads filling leaves the next ops must zap
    /// ([`StepInvariants::device_reads`]).
    fn check_devices_and_kvm(&self) -> Result<(), (&'static str, String)> {
        let mut inv = self
            .step_invariants
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inv.devices_and_probes(&self.memory, &self.iommu, true, true)
            .map_err(|v| (v.name, v.detail))?;
        inv.device_reads(&self.memory, &self.iommu, DEVICE_READS_PER_STEP);
        Ok(())
    }

    /// The invariants, against `model`; the first that does not hold.
    ///
    /// `full` adds [`MemoryManager::check_consistency`], which also reads
    /// every logging slot's dirty log (keeping its pages for `dirty-pages`):
    /// run after every step it would empty KVM's logs before any op could
    /// lose them, so it runs at `check` steps and at the end, and every step
    /// compares the map's expected memslots with the mirror and KVM instead.
    pub fn check(&self, model: &Model, full: bool) -> Result<(), (&'static str, String)> {
        if full {
            self.memory
                .check_consistency()
                .map_err(|e| ("consistency", e))?;
        }
        if full && self.locked_pages {
            self.check_locked()?;
        }
        // The checks both tiers share (`scenario::invariants`), and the one
        // only the simulated KVM allows: reading its memslots directly.
        let shared = |v: invariants::Violation| (v.name, v.detail);
        // The mirror read once, for both comparisons.
        let registered = self.memory.registered();
        invariants::map_mirror_of(&self.memory.load(), &registered).map_err(shared)?;
        let kvm = self.kvm.memslots();
        if kvm != registered {
            return Err((
                "memslots",
                format!("KVM holds {kvm:?}, the mirror {registered:?}"),
            ));
        }
        invariants::hub_plugged(&self.memory).map_err(shared)?;
        let map = self.memory.load();
        self.check_devices_and_kvm()?;
        let charged = self.pins.account().pinned().charged();
        if charged != model.pinned_pages() {
            return Err((
                "pin-account",
                format!(
                    "{charged} pages charged, {} live in the model",
                    model.pinned_pages()
                ),
            ));
        }
        let real = || {
            map.iter().map(|s| {
                (
                    s.range().start().0,
                    s.range().len(),
                    s.flags().read_only,
                    s.flags().dirty_log,
                )
            })
        };
        let want = || {
            model
                .slots
                .slots
                .values()
                .map(|s| (s.start, s.len, s.ro, s.log))
        };
        // Compared in step; collected only to describe a difference.
        if !real().eq(want()) {
            let real: Vec<_> = real().collect();
            let want: Vec<_> = want().collect();
            let at = real
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(real.len().min(want.len()));
            return Err((
                "slots",
                format!(
                    "{} slots in the map, {} in the model; first difference (start, len, ro, log): map {:x?}, model {:x?}",
                    real.len(),
                    want.len(),
                    real.get(at),
                    want.get(at)
                ),
            ));
        }
        // The mappings a resize acts on: which adjacent slots continue the
        // same plug (chain). Chain numbers differ between map and model;
        // whether neighbours share one must not.
        // (start, whether it continues the previous slot's mapping) of
        // every slot but the first, in step.
        fn joined(
            chains: impl Iterator<Item = (u64, u64, u64)>,
        ) -> impl Iterator<Item = (u64, bool)> {
            chains
                .scan(None, |prev: &mut Option<(u64, u64, u64)>, c| {
                    let joined = prev.map(|p| (c.0, p.1 == c.0 && p.2 == c.2));
                    *prev = Some(c);
                    Some(joined)
                })
                .flatten()
        }
        let real_chains = || {
            joined(
                map.iter()
                    .map(|s| (s.range().start().0, s.range().end().0, s.chain())),
            )
        };
        let want_chains = || {
            joined(
                model
                    .slots
                    .slots
                    .values()
                    .map(|s| (s.start, s.end(), s.chain as u64)),
            )
        };
        if !real_chains().eq(want_chains()) {
            let real_chains: Vec<_> = real_chains().collect();
            let want_chains: Vec<_> = want_chains().collect();
            let at = real_chains
                .iter()
                .zip(&want_chains)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a.0);
            return Err((
                "chains",
                format!(
                    "the map and the model disagree on which adjacent slots continue one mapping, first at {at:x?}"
                ),
            ));
        }
        Ok(())
    }
}

/// Runs `actions` on a fresh simulated VM in lockstep with the model; the
/// first step whose outcome the model did not allow, or after which an
/// invariant broke.
pub fn run(layout: &Layout, actions: &[Action]) -> Result<Option<Finding>, SimError> {
    run_with_faults(layout, actions, &[])
}

/// As [`run`], with a memslot change failing (`EIO`) at the given (0-based
/// step, call offset within the step) points. A step that then ends
/// `kvm-rolled-back` where the model predicted `ok` must have changed
/// nothing but the revocable pins it revoked before the failing call: the
/// model is rolled back likewise and the invariants must still hold.
pub fn run_with_faults(
    layout: &Layout,
    actions: &[Action],
    faults: &[(usize, usize)],
) -> Result<Option<Finding>, SimError> {
    let options = SimOptions {
        faults,
        ..SimOptions::default()
    };
    run_with(layout, actions, &options)
}

/// How [`run_with`] runs a timeline.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions<'a> {
    /// Memslot changes that fail (`EIO`): (0-based step, call offset).
    pub faults: &'a [(usize, usize)],
    /// A device thread holds a guard across every memory op ([`GuardReader`]).
    pub guard_reader: bool,
    /// The locked-pages invariant at `check` steps and at the end (reads
    /// `/proc/self/smaps`, whose page-table walk costs more than a whole
    /// short timeline: the libFuzzer tier leaves it to the campaigns).
    pub locked_pages: bool,
    /// Steps between two probes of the simulated KVM's own memslots (0:
    /// never; default [`DEFAULT_PROBE_EVERY`]).
    pub probe_every: u32,
}

impl Default for SimOptions<'_> {
    fn default() -> Self {
        Self {
            faults: &[],
            guard_reader: false,
            locked_pages: true,
            probe_every: DEFAULT_PROBE_EVERY,
        }
    }
}

/// The guest-physical address a memory op starts at: where the guard
/// reader holds a guard while it runs.
fn op_start(action: &Action) -> Option<Gpa> {
    let gpa = match action {
        Action::Unplug(a) => a.gpa.0,
        Action::Protect(a) => a.gpa.0,
        Action::Move(a) => a.gpa.0,
        Action::Resize(a) => a.gpa.0,
        Action::DirtyLog(a) => a.gpa.0,
        _ => return None,
    };
    Some(Gpa(gpa))
}

/// As [`run_with_faults`], with [`SimOptions`]: with `guard_reader`, a
/// device thread ([`GuardReader`]) holds a guard on the first page of every
/// memory op's range while the op runs, and what it read must not change
/// under it.
pub fn run_with(
    layout: &Layout,
    actions: &[Action],
    options: &SimOptions<'_>,
) -> Result<Option<Finding>, SimError> {
    let mut vm = SimVm::new(layout)?;
    Ok(run_on(&mut vm, actions, options, &mut |_, _| {}))
}

thread_local! {
    /// The VM [`run_reusing`] runs on, between timelines.
    static REUSED: std::cell::RefCell<Option<SimVm>> = const { std::cell::RefCell::new(None) };
}

/// As [`run_with`], on one VM per thread that is [reset](SimVm::reset)
/// between timelines instead of built and dropped for each: a timeline
/// gets the same outcomes, details and findings as on a new VM. The VM is
/// dropped (and the next timeline builds a new one) after a finding, a
/// panic, a reset that did not reach the boot state, or for another
/// layout.
pub fn run_reusing(
    layout: &Layout,
    actions: &[Action],
    options: &SimOptions<'_>,
) -> Result<Option<Finding>, SimError> {
    // Taken out of the cell for the run: a panic drops it.
    let kept = REUSED.with(|cell| cell.borrow_mut().take());
    let mut vm = match kept {
        Some(vm) if vm.layout() == layout => vm,
        _ => SimVm::new(layout)?,
    };
    let found = run_on(&mut vm, actions, options, &mut |_, _| {});
    if found.is_none() && vm.reset() {
        REUSED.with(|cell| *cell.borrow_mut() = Some(vm));
    }
    Ok(found)
}

/// `d` with the exact set and the maybe pages the model predicts (as the
/// generator writes them), where the range logs dirty pages.
fn with_expected_set(model: &Model, d: &crate::scenario::step::DirtyPages) -> Action {
    let mut d = d.clone();
    if let Some((must, maybe)) = model.dirty_expectation(d.gpa.0, d.size.0) {
        d.pages = Some(crate::scenario::pages::DirtyWant::Set(must));
        d.maybe_pages = (!maybe.is_empty()).then_some(maybe);
    }
    Action::DirtyPages(d)
}

/// Runs `actions` on `vm`, in its boot state, as [`run_with`] describes;
/// `trace` sees every step's outcome and detail.
pub(super) fn run_on(
    vm: &mut SimVm,
    actions: &[Action],
    options: &SimOptions<'_>,
    trace: &mut dyn FnMut(Outcome, &str),
) -> Option<Finding> {
    let faults = options.faults;
    let layout = vm.layout().clone();
    vm.locked_pages = options.locked_pages;
    vm.set_probe_every(options.probe_every);
    let reader = options
        .guard_reader
        .then(|| GuardReader::start(vm.memory.clone()));
    let mut model = Model::new(layout);
    for (i, action) in actions.iter().enumerate() {
        // A dirty read without an expected set (a libFuzzer input's) is
        // judged against the set the model predicts, as a generated one.
        let expected;
        let action = match action {
            Action::DirtyPages(d) if d.pages.is_none() => {
                expected = with_expected_set(&model, d);
                &expected
            }
            _ => action,
        };
        let fault = faults.iter().find(|f| f.0 == i).map(|f| f.1);
        let before = model.clone();
        let mut allowed = model.predict(action);
        if let Some(offset) = fault {
            vm.inject_failure(offset, libc::EIO);
            if allowed.contains(&Outcome::Ok) {
                allowed.push(Outcome::KvmRolledBack);
            }
        }
        let held = reader
            .as_ref()
            .zip(op_start(action))
            .map(|(r, gpa)| r.hold(gpa));
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.step(action)));
        let guarded = held.map_or(Ok(()), |h| h.finish());
        if fault.is_some() {
            vm.kvm.fail_calls(&[], libc::EIO); // clear what the step did not reach
        }
        let finding = |signature: String, actual: String| Finding {
            step: i + 1,
            kind: action.kind().to_string(),
            what: crate::scenario::driver::describe(action),
            expected: allowed
                .iter()
                .map(|o| o.name())
                .collect::<Vec<_>>()
                .join("|"),
            actual,
            signature,
        };
        let Ok((outcome, detail)) = stepped else {
            return Some(finding(
                format!("panic:{}", action.kind()),
                "the step panicked".into(),
            ));
        };
        trace(outcome, &detail);
        if let Err(detail) = guarded {
            return Some(finding(
                "invariant:guard-reader".into(),
                format!("invariant guard-reader broken: {detail}"),
            ));
        }
        if !allowed.contains(&outcome) {
            return Some(finding(
                format!("{}:{}", action.kind(), outcome),
                format!("{outcome}: {detail}"),
            ));
        }
        if outcome == Outcome::KvmRolledBack {
            // Revocable pins were revoked before the failing call.
            let pins = std::mem::take(&mut model.pins);
            let attempted = std::mem::replace(&mut model, before);
            model.pins = pins;
            model.roll_back_from(&attempted);
        } else if outcome != Outcome::Ok
            && allowed.contains(&Outcome::Ok)
            && action.guest().is_none()
            && !matches!(action, Action::DirtyPages(_))
        {
            // An allowed refusal of a memory op where the model predicted
            // success (host memory that could not be allocated): nothing
            // changed. (A dirty read that reported another allowed set, or
            // a guest command that met other allowed contents, still took
            // effect: the log was read and cleared, the pages were touched.)
            model = before;
        }
        let full = matches!(action, Action::Check(_)) || i + 1 == actions.len();
        if let Err((name, detail)) = vm.check(&model, full) {
            return Some(finding(
                format!("invariant:{name}"),
                format!("invariant {name} broken: {detail}"),
            ));
        }
    }
    None
}

#[cfg(test)]
mod reset_tests;
