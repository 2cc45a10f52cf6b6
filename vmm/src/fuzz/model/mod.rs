//! The reference model: page by page, what every step must do.
//!
//! [`Model::predict`] takes a step, returns the outcomes it may end with (one
//! outcome for a deterministic step, a set where an interleaving decides) and
//! moves the model to the state after it:
//!
//! - the slot map ([`slots`]): plugged or not, access, dirty logging, slot
//!   starts and count, refusals in the slot map's own order;
//! - pins: named pins, charged pages, vetoes of non-revocable pins and
//!   revocation of revocable ones;
//! - contents ([`guest`]): per host page, zero after a plug or a discard, the
//!   pattern a guest fill wrote, the value a DMA fill wrote, or unknown; kept
//!   across move, protect and refused ops because they are keyed by host page;
//! - async guest commands in flight: a memory op that takes their range away
//!   before their `wait` widens their expectation to include `unplugged`.

pub mod guest;
pub mod slots;

use std::collections::{BTreeMap, BTreeSet};

use crate::scenario::pages::{DirtyWant, PageSet};
use crate::scenario::step::{Access, Action};
use crate::scenario::Outcome;

use guest::Content;
use slots::{Change, Limits, Slots, PAGE};

/// 2 MiB.
pub const HUGE: u64 = 2 << 20;

/// The end of the IOMMU stage-2 table's guest-physical space.
pub const STAGE2_LIMIT: u64 = 1 << 48;

/// Plugs larger than this may fail to allocate host memory (`backing`).
pub const HUGE_PLUG: u64 = 1 << 40;

/// The shape of the VM the model describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The fixed boot region `[0, boot_end)`.
    pub boot_end: u64,
    /// Guest RAM: start, length.
    pub ram: (u64, u64),
    /// Slot-map limits.
    pub limits: Limits,
    /// Pin limit in pages.
    pub pin_limit: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Guest commands must stay below this (the guest's identity map).
    pub guest_end: u64,
    /// The VM's dirty-log mode. In manual mode (initially set) every page of
    /// a memslot that starts logging (created logging, or logging switched
    /// on) is dirty from then on, as KVM reports it.
    pub dirty_log: crate::mm::manager::DirtyLogMode,
}

/// A held pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MPin {
    /// Range.
    pub range: (u64, u64),
    /// Revocable.
    pub revocable: bool,
    /// Revoked by a memory change.
    pub revoked: bool,
}

impl MPin {
    fn pages(&self) -> u64 {
        if self.revoked {
            0
        } else {
            (self.range.1 - self.range.0) / PAGE
        }
    }
}

/// An async guest command not yet collected.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    step: usize,
    range: (u64, u64),
    /// A DMA transfer (its pins are revoked by any change of its range).
    dma: bool,
    /// It writes (a fill, write or touch for writing; a DMA fill or copy).
    write: bool,
    /// The frames it logs (a vCPU's) or dirties (a device's) if nothing
    /// races it: maybe dirty until its `wait`.
    frames: Vec<u64>,
    /// What it writes if nothing races it: host page -> content, known
    /// once its `wait` collects it.
    writes: Vec<((usize, u64), Content)>,
    /// Something raced it (a memory op, a dirty-log switch or report, or
    /// another command over its range): what it did is not known.
    raced: bool,
}

/// The reference model; see the module docs.
#[derive(Debug, Clone)]
pub struct Model {
    /// The slot map.
    pub slots: Slots,
    /// Pins by name.
    pub pins: BTreeMap<String, MPin>,
    /// Host page (mapping, offset) -> contents; absent is zero.
    pub contents: imbl::OrdMap<(usize, u64), Content>,
    /// Frames written by vCPUs while logged, not yet reported (see
    /// [`dirty_expectation`](Self::dirty_expectation)).
    pub dirty: imbl::OrdSet<u64>,
    /// Frames KVM may report dirty though no vCPU wrote them, kept until a
    /// `dirty-pages` covers them: frames a vCPU only read while their slot
    /// logged (a shadow MMU maps a page writable, and logs it, on a read
    /// fault when the guest's PTE is dirty), and in manual mode the frames
    /// of logging slots a rolled-back op changed
    /// ([`roll_back_from`](Self::roll_back_from)).
    pub maybe_dirty: imbl::OrdSet<u64>,
    /// Frames devices wrote (the IOMMU's dirty bits, reported in every mode
    /// whether or not their slot logs), not yet reported.
    pub device_dirty: imbl::OrdSet<u64>,
    /// Frames an async DMA transfer may have written.
    pub device_maybe: imbl::OrdSet<u64>,
    /// The VM.
    pub layout: Layout,
    pending: BTreeMap<u64, Pending>,
    steps: usize,
    widen: Vec<(usize, Outcome)>,
    /// An async command is being predicted: its writes may land later.
    in_async: bool,
    /// The frames the async command being predicted logs or dirties.
    async_frames: Vec<u64>,
    /// What the async command being predicted writes, if nothing races it.
    async_writes: Vec<((usize, u64), Content)>,
}

/// The outcomes of a `dirty-pages` expecting `want` (and `want_maybe`)
/// when the report R may be any set with `must ⊆ R ⊆ all`: `ok` if some R
/// meets the expectation, `dirty-count` if some R does not.
fn judge_report(
    must: &BTreeSet<u64>,
    all: &BTreeSet<u64>,
    want: Option<&DirtyWant>,
    want_maybe: Option<&PageSet>,
) -> Vec<Outcome> {
    let (ok, wrong) = match want {
        None => (true, false),
        Some(DirtyWant::Count(n)) => {
            let (lo, hi) = (must.len() as u64, all.len() as u64);
            ((lo..=hi).contains(n), lo != hi || *n != lo)
        }
        Some(DirtyWant::Set(w)) => {
            let empty = PageSet::default();
            let wm = want_maybe.unwrap_or(&empty);
            // Some R meets w ⊆ R ⊆ w ∪ wm iff must ⊆ w ∪ wm and w ⊆ all;
            // every R does iff w ⊆ must and all ⊆ w ∪ wm.
            let in_either = |f: &u64| w.contains(*f) || wm.contains(*f);
            let ok = must.iter().all(in_either) && w.count_in(all) == w.len();
            let always = w.count_in(must) == w.len() && all.iter().all(in_either);
            (ok, !always)
        }
    };
    let mut outcomes = Vec::new();
    if ok {
        outcomes.push(Outcome::Ok);
    }
    if wrong {
        outcomes.push(Outcome::DirtyCount);
    }
    outcomes
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The guest-physical ranges a memory op may change (a resize: everything
/// from the slot's start).
fn touched(action: &Action) -> Vec<(u64, u64)> {
    let r = |gpa: u64, size: u64| (gpa, gpa.saturating_add(size));
    match action {
        Action::Plug(p) => vec![r(p.gpa.0, p.size.0)],
        Action::Unplug(u) => vec![r(u.gpa.0, u.size.0)],
        Action::Protect(p) => vec![r(p.gpa.0, p.size.0)],
        Action::Move(m) => vec![r(m.gpa.0, m.size.0), r(m.to.0, m.size.0)],
        Action::Resize(z) => vec![(z.gpa.0, u64::MAX)],
        _ => Vec::new(),
    }
}

/// The host page size of a backing name (a plug's mapping is its size
/// rounded up to it), or `None` if it is not one the model knows. Slots of
/// every backing the model plugs are cut at 4 KiB (THP included: Linux
/// splits it; only hugetlb cuts at 2 MiB, and it is not generated).
pub fn backing_page_size(name: &str) -> Option<u64> {
    match name {
        "anon" | "shared" | "memfd" | "file" => Some(PAGE),
        "thp" => Some(HUGE),
        _ => None,
    }
}

impl Model {
    /// The VM as it starts: the boot region (fixed) and guest RAM plugged.
    pub fn new(layout: Layout) -> Self {
        let mut slots = Slots::new(layout.limits);
        slots.seed_slot(0, layout.boot_end, true);
        slots.seed_slot(layout.ram.0, layout.ram.1, false);
        Self {
            slots,
            pins: BTreeMap::new(),
            contents: imbl::OrdMap::new(),
            dirty: imbl::OrdSet::new(),
            maybe_dirty: imbl::OrdSet::new(),
            device_dirty: imbl::OrdSet::new(),
            device_maybe: imbl::OrdSet::new(),
            layout,
            pending: BTreeMap::new(),
            steps: 0,
            widen: Vec::new(),
            in_async: false,
            async_frames: Vec::new(),
            async_writes: Vec::new(),
        }
    }

    /// A vCPU accesses `[a, b)`: the pages of logging slots may be logged
    /// even if it only reads them.
    fn note_vcpu_access(&mut self, (a, b): (u64, u64)) {
        for s in self.slots.overlapping((a, b)) {
            if !s.log {
                continue;
            }
            let (lo, hi) = (a.max(s.start), b.min(s.end()));
            for f in lo / PAGE..hi.div_ceil(PAGE) {
                self.maybe_dirty.insert(f);
            }
        }
    }

    /// What a `dirty-pages` over `[gpa, gpa + size)` would report now: the
    /// frames it must report and those it may (`None` if the range wraps).
    pub fn dirty_expectation(&self, gpa: u64, size: u64) -> Option<(PageSet, PageSet)> {
        let end = gpa.checked_add(size)?;
        let r = gpa / PAGE..end.div_ceil(PAGE);
        let must: BTreeSet<u64> = self
            .dirty
            .range(r.clone())
            .chain(self.device_dirty.range(r.clone()))
            .copied()
            .collect();
        let maybe = self
            .maybe_dirty
            .range(r.clone())
            .chain(self.device_maybe.range(r))
            .copied()
            .filter(|f| !must.contains(f));
        Some((
            PageSet::from_frames(must.iter().copied()),
            PageSet::from_frames(maybe),
        ))
    }

    /// `dirty-pages`: KVM's log is read and cleared over the range's pages
    /// before the IOMMU's table (whole pages of a 48-bit space) is read.
    /// Its outcomes: frames in [`maybe_dirty`](Self::maybe_dirty) and
    /// [`device_maybe`](Self::device_maybe) may or may not be reported, so
    /// `ok` if some report between the certain frames and the certain plus
    /// the maybe ones meets `want`, `dirty-count` if some does not; a range
    /// that would be `not-logging` may report maybe frames instead.
    fn dirty_pages(
        &mut self,
        gpa: u64,
        size: u64,
        want: Option<&DirtyWant>,
        want_maybe: Option<&PageSet>,
    ) -> Vec<Outcome> {
        let Some(end) = gpa.checked_add(size) else {
            return vec![Outcome::RangeOverflow];
        };
        let r = gpa / PAGE..end.div_ceil(PAGE);
        let frames: Vec<u64> = self.dirty.range(r.clone()).copied().collect();
        // KVM's log exists only for logging slots: with none in the range and
        // nothing harvested from one, the read is refused (before the IOMMU
        // is read, so device dirty bits stay).
        let logging = self.slots.overlapping((gpa, end)).iter().any(|s| s.log);
        let maybe: Vec<u64> = self.maybe_dirty.range(r.clone()).copied().collect();
        let extra = maybe.iter().filter(|&f| !self.dirty.contains(f)).count() as u64;
        for f in &maybe {
            self.maybe_dirty.remove(f);
        }
        let mut outcomes = Vec::new();
        let device: Vec<u64> = self.device_dirty.range(r.clone()).copied().collect();
        let device_maybe: Vec<u64> = self.device_maybe.range(r.clone()).copied().collect();
        if !logging && frames.is_empty() {
            outcomes.push(Outcome::NotLogging);
            if extra == 0 {
                self.keep_racing_writes((gpa, end));
                return outcomes;
            }
            // Refused or not: the device bits may have been taken.
            for f in &device {
                self.device_dirty.remove(f);
                self.device_maybe.insert(*f);
            }
            self.keep_racing_writes((gpa, end));
            let must: BTreeSet<u64> = device.iter().copied().collect();
            let all = must.iter().chain(&maybe).chain(&device_maybe).copied();
            outcomes.extend(judge_report(&must, &all.collect(), want, want_maybe));
            return outcomes;
        }
        for f in &frames {
            self.dirty.remove(f);
        }
        if end
            .checked_next_multiple_of(PAGE)
            .is_none_or(|e| e > STAGE2_LIMIT)
        {
            self.keep_racing_writes((gpa, end));
            outcomes.push(Outcome::Stage2);
            return outcomes;
        }
        for f in device.iter().chain(&device_maybe) {
            self.device_dirty.remove(f);
            self.device_maybe.remove(f);
        }
        self.keep_racing_writes((gpa, end));
        let must: BTreeSet<u64> = frames.iter().chain(&device).copied().collect();
        let all: BTreeSet<u64> = must
            .iter()
            .chain(&maybe)
            .chain(&device_maybe)
            .copied()
            .collect();
        outcomes.extend(judge_report(&must, &all, want, want_maybe));
        outcomes
    }

    /// An async write still in flight may land after a `dirty-pages` read
    /// the log: its frames in `range` stay maybe dirty.
    fn keep_racing_writes(&mut self, range: (u64, u64)) {
        let racing: Vec<((u64, u64), bool)> = self
            .pending
            .values_mut()
            .filter(|p| p.write && overlaps(p.range, range))
            .map(|p| {
                p.raced = true;
                (p.range, p.dma)
            })
            .collect();
        for (r, dma) in racing {
            self.maybe_write_to((r.0.max(range.0), r.1.min(range.1)), dma);
        }
    }

    /// An async write over `[a, b)` may land in the memory there now: its
    /// contents are unknown, and its frames maybe dirty (a vCPU's in a
    /// logging slot, a device's anywhere plugged).
    fn maybe_write_to(&mut self, (a, b): (u64, u64), dma: bool) {
        let mut page = a - a % PAGE;
        while page < b {
            if let Some((map, off, ro)) = self.slots.host(page) {
                if !ro {
                    self.contents.insert((map, off), Content::Unknown);
                    if dma {
                        self.device_maybe.insert(page / PAGE);
                    } else if self.slots.lookup(page).is_some_and(|s| s.log) {
                        self.maybe_dirty.insert(page / PAGE);
                    }
                }
            }
            page = match page.checked_add(PAGE) {
                Some(p) => p,
                None => break,
            };
        }
    }

    /// After `attempted`'s memslot calls failed and were rolled back: the
    /// model is `self` (the state before), KVM holds what it held before,
    /// but in manual mode the rollback re-created (or switched logging on
    /// again on) the logging memslots the op had deleted or changed, and
    /// initially set marks every page of them dirty in KVM; pages harvested
    /// from the memslots the op created land there too (the manager
    /// attributes them by host address). Those are over-reports, never
    /// losses: the pages of the logging slots the op changed may be
    /// reported. (In the other modes a re-created memslot starts clean.)
    pub fn roll_back_from(&mut self, attempted: &Model) {
        if !self.layout.dirty_log.initially_set() {
            return;
        }
        let key = |s: &slots::MSlot| (s.start, s.len, s.map, s.off, s.ro, s.log);
        let changed: Vec<(u64, u64)> = self
            .slots
            .slots
            .values()
            .filter(|s| s.log && attempted.slots.slots.get(&s.start).map(key) != Some(key(s)))
            .map(|s| (s.start, s.end()))
            .collect();
        for (start, end) in changed {
            self.maybe_dirty.extend(start / PAGE..end / PAGE);
        }
    }

    /// Pages pinned now (what the pin account must hold).
    pub fn pinned_pages(&self) -> u64 {
        self.pins.values().map(MPin::pages).sum()
    }

    /// Whether vCPU `v` has an async command in flight.
    pub fn has_pending(&self, v: u64) -> bool {
        self.pending.contains_key(&v)
    }

    /// Whether a DMA transfer is in flight (its pins are charged: the
    /// pinned-page count is not known).
    pub fn dma_in_flight(&self) -> bool {
        self.pending.values().any(|p| p.dma)
    }

    /// The vCPUs with async commands in flight.
    pub fn pending_vcpus(&self) -> Vec<u64> {
        self.pending.keys().copied().collect()
    }

    /// Expectations of earlier (async) steps to widen: (0-based step, outcome).
    pub fn take_widenings(&mut self) -> Vec<(usize, Outcome)> {
        std::mem::take(&mut self.widen)
    }

    /// The outcomes `action` may end with, and the state after it.
    pub fn predict(&mut self, action: &Action) -> Vec<Outcome> {
        let n = self.steps;
        self.steps += 1;
        match action {
            Action::Plug(_)
            | Action::Unplug(_)
            | Action::Protect(_)
            | Action::Move(_)
            | Action::Resize(_)
            | Action::DirtyLog(_) => {
                // Host memory for a huge plug or a huge grow with a new
                // mapping may not be allocated: the plug fails with
                // `backing` before the slot map judges it, the grow with
                // `no-room-to-grow`; either changes nothing.
                let big_grow = matches!(action, Action::Resize(_))
                    && self
                        .plan(action)
                        .is_ok_and(|(c, _)| c.new_mapping.is_some_and(|m| m.len > HUGE_PLUG));
                let o = self.mem_op(action);
                match action {
                    Action::Plug(p) if p.size.0 > HUGE_PLUG && o != Outcome::SlotTooLarge => {
                        vec![o, Outcome::Backing]
                    }
                    Action::Resize(_) if big_grow && o == Outcome::Ok => {
                        vec![o, Outcome::NoRoomToGrow]
                    }
                    _ => vec![o],
                }
            }
            Action::DirtyPages(d) => {
                self.dirty_pages(d.gpa.0, d.size.0, d.pages.as_ref(), d.maybe_pages.as_ref())
            }
            Action::PlugMany(p) => vec![self.plug_many(p.gpa.0, p.count.map(|c| c.0))],
            Action::Check(c) => match c.pages {
                Some(p) if p != self.pinned_pages() => vec![Outcome::PinnedPages],
                _ => vec![Outcome::Ok],
            },
            Action::Pin(p) => vec![self.pin(
                &p.name,
                p.gpa.0,
                p.size.0,
                p.write.unwrap_or(true),
                p.revocable.unwrap_or(true),
            )],
            Action::Unpin(u) => match self.pins.remove(&u.name) {
                Some(_) => vec![Outcome::Ok],
                None => vec![Outcome::NoSuchPin],
            },
            Action::Wait(w) if w.completed.is_none() => {
                // Nothing raced it: it did what the model predicted at its
                // issue, so the pages it wrote hold what it wrote (unless a
                // later command wrote them again), and the frames it wrote
                // are certainly dirty now.
                if let Some(p) = self.pending.remove(&w.vcpu).filter(|p| !p.raced) {
                    for (key, c) in p.writes {
                        if self.contents.get(&key) == Some(&Content::Unknown) {
                            self.set(key, c);
                        }
                    }
                    for f in p.frames {
                        if p.dma {
                            self.device_maybe.remove(&f);
                            self.device_dirty.insert(f);
                        } else {
                            self.maybe_dirty.remove(&f);
                            self.dirty.insert(f);
                        }
                    }
                }
                vec![Outcome::Ok]
            }
            // A `wait` for some of the commands collects nothing: the
            // batch is still in flight.
            Action::Wait(_) | Action::Sleep(_) | Action::Stage2Dump(_) => vec![Outcome::Ok],
            _ => {
                // A guest command over the range of another vCPU's async
                // command in flight races it: the async one may see either.
                if let Some(range) = guest::range_of(action) {
                    self.widen_pending(&[range]);
                }
                if !matches!(
                    action,
                    Action::DmaChecksum(_) | Action::DmaCopy(_) | Action::DmaFill(_)
                ) {
                    if let Some(range) = guest::range_of(action) {
                        self.note_vcpu_access(range);
                    }
                }
                self.in_async = matches!(action.guest(), Some((_, _, true)));
                let set = self.guest(action);
                self.in_async = false;
                let frames = std::mem::take(&mut self.async_frames);
                let writes = std::mem::take(&mut self.async_writes);
                // Another vCPU's async write in flight over this command's
                // range may land after it.
                if let Some(range) = guest::range_of(action) {
                    self.race_writes(&[range]);
                }
                if let Some((vcpu, _, true)) = action.guest() {
                    if let Some(range) = guest::range_of(action) {
                        let dma = matches!(
                            action,
                            Action::DmaChecksum(_) | Action::DmaCopy(_) | Action::DmaFill(_)
                        );
                        self.pending.insert(
                            vcpu,
                            Pending {
                                step: n,
                                range,
                                dma,
                                write: guest::writes(action),
                                frames,
                                writes,
                                raced: false,
                            },
                        );
                    }
                }
                set
            }
        }
    }

    fn mem_op(&mut self, action: &Action) -> Outcome {
        let (change, _) = match self.plan(action) {
            Ok(c) => c,
            Err(o) => return o,
        };
        for r in &change.removed {
            if self
                .pins
                .values()
                .any(|p| !p.revocable && !p.revoked && overlaps(p.range, *r))
            {
                return Outcome::Vetoed;
            }
        }
        let before = self.slots.slots.clone();
        self.commit(change, &touched(action));
        if self.layout.dirty_log.initially_set() {
            self.set_started_logging(&before);
        }
        // Async writes in flight may land after the op, in what is there
        // now (logging switched on included).
        if let Action::DirtyLog(d) = action {
            self.race_writes(&[(d.gpa.0, d.gpa.0.saturating_add(d.size.0))]);
        } else {
            self.race_writes(&touched(action));
        }
        Outcome::Ok
    }

    /// Manual mode: KVM sets every bit of a memslot that starts logging. A
    /// logging slot that was not in `before` with the same range, host
    /// memory and flags is a memslot KVM created (or switched logging on).
    fn set_started_logging(&mut self, before: &imbl::OrdMap<u64, slots::MSlot>) {
        let key = |s: &slots::MSlot| (s.start, s.len, s.map, s.off, s.ro, s.log);
        let started: Vec<(u64, u64)> = self
            .slots
            .slots
            .values()
            .filter(|s| s.log && before.get(&s.start).map(key) != Some(key(s)))
            .map(|s| (s.start, s.end()))
            .collect();
        for (start, end) in started {
            self.dirty.extend(start / PAGE..end / PAGE);
        }
    }

    /// The change `action` makes, or its refusal; and whether its removed
    /// ranges are unmapped (vs write-protected).
    fn plan(&self, action: &Action) -> Result<(Change, bool), Outcome> {
        let s = &self.slots;
        match action {
            Action::Plug(p) => {
                let (mut ro, mut log) = (false, false);
                for f in p.flags.iter().flatten() {
                    match f.as_str() {
                        "readonly" | "read-only" => ro = true,
                        "dirty-log" => log = true,
                        _ => return Err(Outcome::InvalidFlags),
                    }
                }
                let psize = match p.backing.as_deref() {
                    None => PAGE,
                    Some(b) => backing_page_size(b).ok_or(Outcome::UnknownBacking)?,
                };
                Ok((s.plug(p.gpa.0, p.size.0, psize, ro, log)?, false))
            }
            Action::Unplug(u) => Ok((s.unplug(u.gpa.0, u.size.0)?, true)),
            Action::Protect(p) => {
                let ro = p.access == Access::Ro;
                Ok((s.reflag(p.gpa.0, p.size.0, Some(ro), None)?, false))
            }
            Action::DirtyLog(d) => Ok((s.reflag(d.gpa.0, d.size.0, None, Some(d.on))?, false)),
            Action::Move(m) => Ok((s.move_range(m.gpa.0, m.size.0, m.to.0)?, true)),
            Action::Resize(r) => Ok((s.resize(r.gpa.0, r.new_size.0)?, true)),
            _ => Err(Outcome::Stopped),
        }
    }

    /// Whether `action` (a memory op) would succeed, without changing the model.
    pub fn would_succeed(&self, action: &Action) -> bool {
        self.clone().mem_op(action) == Outcome::Ok
    }

    fn commit(&mut self, change: Change, touched: &[(u64, u64)]) {
        for r in &change.removed {
            for p in self.pins.values_mut() {
                if p.revocable && overlaps(p.range, *r) {
                    p.revoked = true;
                }
            }
        }
        self.widen_pending(touched);
        for (map, off, len) in &change.discards {
            let keys: Vec<_> = self
                .contents
                .range((*map, *off)..(*map, off + len))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.contents.remove(&k);
            }
        }
        self.slots.adopt(&change);
    }

    /// Async writes in flight over a range an op changed may land after it:
    /// in the memory there now ([`maybe_write_to`](Self::maybe_write_to)).
    fn race_writes(&mut self, touched: &[(u64, u64)]) {
        let racing: Vec<((u64, u64), bool)> = self
            .pending
            .values_mut()
            .filter(|p| p.write && touched.iter().any(|t| overlaps(p.range, *t)))
            .map(|p| {
                p.raced = true;
                (p.range, p.dma)
            })
            .collect();
        for (range, dma) in racing {
            self.maybe_write_to(range, dma);
        }
    }

    /// An async command over a range an op changed may have run before or
    /// after it (or across it): every outcome of either is allowed (a write
    /// may also find the memory read-only).
    fn widen_pending(&mut self, touched: &[(u64, u64)]) {
        for p in self.pending.values_mut() {
            if !touched.iter().any(|t| overlaps(p.range, *t)) {
                continue;
            }
            p.raced = true;
            let set: &[Outcome] = if p.dma {
                &[
                    Outcome::Ok,
                    Outcome::DmaRevoked,
                    Outcome::DmaFault,
                    Outcome::Mismatch,
                ]
            } else if p.write {
                &[
                    Outcome::Ok,
                    Outcome::Unplugged,
                    Outcome::ReadOnly,
                    Outcome::Mismatch,
                ]
            } else {
                &[Outcome::Ok, Outcome::Unplugged, Outcome::Mismatch]
            };
            self.widen.extend(set.iter().map(|o| (p.step, *o)));
        }
    }

    fn plug_many(&mut self, gpa: u64, count: Option<u64>) -> Outcome {
        let free = self
            .layout
            .limits
            .max_slots
            .saturating_sub(self.slots.slots.len()) as u64;
        let count = count.unwrap_or(free);
        if count == 0 {
            return Outcome::Ok;
        }
        if count > free {
            return Outcome::TooManySlots;
        }
        // All or nothing: a refusal of any slot changes nothing.
        let mut next = self.slots.clone();
        let map = next.mappings.len();
        next.mappings.push(slots::MMapping {
            page_size: PAGE,
            len: count * PAGE,
        });
        for i in 0..count {
            let at = gpa.wrapping_add(i * 2 * PAGE);
            match next.plug(at, PAGE, PAGE, false, false) {
                Ok(mut c) => {
                    // One mapping for all: window i of it.
                    if let Some(slot) = c.slots.get_mut(&at) {
                        slot.map = map;
                        slot.off = i * PAGE;
                    }
                    c.new_mapping = None;
                    next.adopt(&c);
                }
                Err(o) => return o,
            }
        }
        self.slots = next;
        let range = (gpa, gpa.saturating_add(count * 2 * PAGE));
        self.widen_pending(&[range]);
        self.race_writes(&[range]);
        Outcome::Ok
    }

    fn pin(&mut self, name: &str, gpa: u64, size: u64, write: bool, revocable: bool) -> Outcome {
        // A name already held is refused before anything is pinned.
        if self.pins.contains_key(name) {
            return Outcome::DuplicatePin;
        }
        let Some(end) = gpa.checked_add(size) else {
            return Outcome::BadRange;
        };
        if size == 0 || gpa % PAGE != 0 || size % PAGE != 0 {
            return Outcome::BadRange;
        }
        if let Err(o) = self.walk(gpa, end, write) {
            return o;
        }
        if self.pinned_pages() + size / PAGE > self.layout.pin_limit {
            return Outcome::PinLimit;
        }
        self.pins.insert(
            name.to_string(),
            MPin {
                range: (gpa, end),
                revocable,
                revoked: false,
            },
        );
        Outcome::Ok
    }

    /// Walks the pages of `[a, b)` in order as a pin or guest access does:
    /// the first unplugged page is `not-plugged`, the first read-only one
    /// (when writing) `read-only`. Every page of a slot is plugged and has
    /// the slot's access, so the walk goes a slot at a time.
    fn walk(&self, a: u64, b: u64, write: bool) -> Result<(), Outcome> {
        let mut page = a - a % PAGE;
        while page < b {
            match self.slots.lookup(page) {
                None => return Err(Outcome::NotPlugged),
                Some(s) if s.ro && write => return Err(Outcome::ReadOnly),
                Some(s) => page = s.end(),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
