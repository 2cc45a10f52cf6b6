//! Guest commands and DMA in the model: which page an access fails on, what
//! a fill or a DMA writes, and what a verify, read or checksum must see.

use guest_image::protocol::pattern_word;

use crate::scenario::step::{Action, Guest};
use crate::scenario::Outcome;

use super::slots::PAGE;
use super::Model;

/// What a host page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Zero (a fresh plug, a discard). The default.
    Zero,
    /// A fill's pattern: the word at page offset `i` is
    /// `pattern_word(seed, base + i)`.
    Pattern {
        /// The fill's seed.
        seed: u64,
        /// The pattern address of the page's first word.
        base: u64,
    },
    /// Every word is this value (a DMA fill).
    Word(u64),
    /// Written in part or by something the model does not follow.
    Unknown,
}

impl Content {
    /// The word at page offset `off`, if known.
    pub fn word(self, off: u64) -> Option<u64> {
        match self {
            Content::Zero => Some(0),
            Content::Word(v) => Some(v),
            Content::Pattern { seed, base } => Some(pattern_word(seed, base.wrapping_add(off))),
            Content::Unknown => None,
        }
    }

    /// The wrapping sum of the page's words, if known.
    fn sum(self) -> Option<u64> {
        (0..PAGE / 8).try_fold(0u64, |acc, i| Some(acc.wrapping_add(self.word(i * 8)?)))
    }
}

/// The guest-physical range a guest command touches.
pub fn range_of(action: &Action) -> Option<(u64, u64)> {
    let (gpa, size) = match action {
        Action::Fill(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::Verify(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::VerifyConst(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::Touch(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::Read(Guest { command: c, .. }) => (c.gpa.0, 8),
        Action::Write(Guest { command: c, .. }) => (c.gpa.0, 8),
        Action::DmaFill(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::DmaChecksum(Guest { command: c, .. }) => (c.gpa.0, c.size.0),
        Action::DmaCopy(Guest { command: c, .. }) => {
            let (a, b) = (c.gpa.0.min(c.to.0), c.gpa.0.max(c.to.0));
            (a, (b - a).checked_add(c.size.0)?)
        }
        _ => return None,
    };
    Some((gpa, gpa.checked_add(size)?))
}

/// Whether a guest command or DMA transfer writes memory.
pub fn writes(action: &Action) -> bool {
    match action {
        Action::Fill(_) | Action::Write(_) | Action::DmaFill(_) | Action::DmaCopy(_) => true,
        Action::Touch(Guest { command: t, .. }) => t.write.unwrap_or(false),
        _ => false,
    }
}

/// Pages overlapping `[a, b)`, with the part of each covered.
fn pages(a: u64, b: u64) -> impl Iterator<Item = (u64, bool)> {
    let first = a - a % PAGE;
    (0..)
        .map(move |i| first + i * PAGE)
        .take_while(move |p| *p < b)
        .map(move |p| (p, p >= a && p + PAGE <= b))
}

impl Model {
    /// The content of guest page `page` and its host key, if plugged.
    pub fn content_at(&self, page: u64) -> Option<(Content, (usize, u64), bool)> {
        let (map, off, ro) = self.slots.host(page)?;
        let key = (map, off);
        Some((
            self.contents.get(&key).copied().unwrap_or(Content::Zero),
            key,
            ro,
        ))
    }

    pub(super) fn set(&mut self, key: (usize, u64), c: Content) {
        // An async write may land before or after later steps: what the
        // page holds is not known until its `wait` (if nothing raced it).
        let c = if self.in_async {
            self.async_writes.push((key, c));
            Content::Unknown
        } else {
            c
        };
        if c == Content::Zero {
            self.contents.remove(&key);
        } else {
            self.contents.insert(key, c);
        }
    }

    /// Guest writes over `[a, b)` in order: pages before the first failing
    /// one get `content(page, whole)`; the failure ends the command.
    fn guest_write(&mut self, a: u64, b: u64, content: impl Fn(u64, bool) -> Content) -> Outcome {
        for (page, whole) in pages(a, b) {
            match self.content_at(page) {
                None => return Outcome::Unplugged,
                Some((_, _, true)) => return Outcome::ReadOnly,
                Some((_, key, false)) => {
                    self.set(key, content(page, whole));
                    self.log_write(page);
                }
            }
        }
        Outcome::Ok
    }

    /// A guest write to `page` is logged if its slot logs (KVM's fault
    /// path); an async one may not have landed when a `dirty-pages` reads
    /// the log, so it is maybe dirty.
    fn log_write(&mut self, page: u64) {
        if self.slots.lookup(page).is_some_and(|s| s.log && !s.ro) {
            if self.in_async {
                self.maybe_dirty.insert(page / PAGE);
                self.async_frames.push(page / PAGE);
            } else {
                self.dirty.insert(page / PAGE);
            }
        }
    }

    /// The IOMMU maps THP-backed memory with 2 MiB leaves where the
    /// aligned 2 MiB lies in the slot, and a leaf's Dirty bit (copied to
    /// all 512 small leaves if it is split later) reports every frame under
    /// it, as a hardware IOMMU reports dirty IOPTEs at their size: the
    /// other frames of a written page's 2 MiB region in its slot may be
    /// reported too. (Whether the leaf is huge depends on the host
    /// address's alignment and on earlier splits, so they are maybe dirty.)
    ///
    /// Returns the frames' range (gpa bounds) it covered: a write to
    /// another page of it would note the same frames.
    fn note_huge_leaf_write(&mut self, page: u64) -> (u64, u64) {
        let Some(slot) = self.slots.lookup(page) else {
            return (page, page + PAGE);
        };
        if self.slots.mappings[slot.map].page_size < super::HUGE {
            return (page, page + PAGE);
        }
        let region = page - page % super::HUGE;
        let (lo, hi) = (
            region.max(slot.start),
            region.saturating_add(super::HUGE).min(slot.end()),
        );
        for f in lo / PAGE..hi / PAGE {
            if !self.device_dirty.contains(&f) && !self.device_maybe.contains(&f) {
                self.device_maybe.insert(f);
            }
        }
        (lo, hi)
    }

    /// Guest reads over `[a, b)` in order, `check(content, page)` saying
    /// whether the page matches (`None`: maybe).
    fn guest_read(
        &self,
        a: u64,
        b: u64,
        check: impl Fn(Content, u64) -> Option<bool>,
    ) -> Vec<Outcome> {
        let mut set = Vec::new();
        for (page, _) in pages(a, b) {
            match self.content_at(page) {
                None => {
                    set.push(Outcome::Unplugged);
                    return set;
                }
                Some((c, _, _)) => match check(c, page) {
                    Some(true) => {}
                    Some(false) => {
                        set.push(Outcome::Mismatch);
                        return set;
                    }
                    None => set.push(Outcome::Mismatch),
                },
            }
        }
        set.push(Outcome::Ok);
        set.dedup();
        set
    }

    /// A guest command's or DMA transfer's outcomes, and its effect.
    pub(super) fn guest(&mut self, action: &Action) -> Vec<Outcome> {
        let Some((a, b)) = range_of(action) else {
            return vec![Outcome::Ok]; // spin
        };
        match action {
            Action::Fill(Guest { command: c, .. }) => {
                let (seed, origin, gpa) = (c.seed.0, c.origin.map_or(c.gpa.0, |o| o.0), c.gpa.0);
                vec![self.guest_write(a, b, |page, whole| {
                    if whole {
                        Content::Pattern {
                            seed,
                            base: origin.wrapping_add(page - gpa),
                        }
                    } else {
                        Content::Unknown
                    }
                })]
            }
            Action::Write(_) => vec![self.guest_write(a, b, |_, _| Content::Unknown)],
            Action::Touch(Guest { command: t, .. }) => {
                let stride = t.stride.map_or(PAGE, |s| s.0);
                let write = t.write.unwrap_or(false);
                let mut at = a;
                while at < b {
                    let page = at - at % PAGE;
                    match self.content_at(page) {
                        None => return vec![Outcome::Unplugged],
                        Some((_, _, true)) if write => return vec![Outcome::ReadOnly],
                        Some((_, key, _)) if write => {
                            self.set(key, Content::Unknown);
                            self.log_write(page);
                        }
                        _ => {}
                    }
                    match at.checked_add(stride) {
                        Some(n) => at = n,
                        None => break,
                    }
                }
                vec![Outcome::Ok]
            }
            Action::Verify(Guest { command: c, .. }) => {
                let (seed, origin, gpa) = (c.seed.0, c.origin.map_or(c.gpa.0, |o| o.0), c.gpa.0);
                self.guest_read(a, b, |content, page| {
                    let want = origin.wrapping_add(page.wrapping_sub(gpa));
                    match content {
                        Content::Pattern { seed: s, base } => Some(s == seed && base == want),
                        Content::Unknown => None,
                        _ => Some(false),
                    }
                })
            }
            Action::VerifyConst(Guest { command: c, .. }) => {
                let v = c.value.0;
                self.guest_read(a, b, |content, _| match content {
                    Content::Zero => Some(v == 0),
                    Content::Word(w) => Some(v == w),
                    Content::Pattern { .. } => Some(false),
                    Content::Unknown => None,
                })
            }
            Action::Read(Guest { command: r, .. }) => {
                let want = r.value.map(|v| v.0);
                let off = r.gpa.0 % PAGE;
                self.guest_read(a, b, |content, _| match want {
                    None => Some(true),
                    Some(v) => content.word(off).map(|w| w == v),
                })
            }
            Action::DmaFill(Guest { command: c, .. }) => {
                let v = c.value.0;
                self.dma(None, Some((a, b)), |_, whole| {
                    if whole {
                        Content::Word(v)
                    } else {
                        Content::Unknown
                    }
                })
                .map_or_else(|o| vec![o], |_| vec![Outcome::Ok])
            }
            Action::DmaChecksum(Guest { command: c, .. }) => {
                let want = c.value.map(|v| v.0);
                let sum = self.checksum(a, b);
                match self.dma(Some((a, b)), None, |_, _| Content::Unknown) {
                    Err(o) => vec![o],
                    Ok(()) => match (want, sum) {
                        (None, _) => vec![Outcome::Ok],
                        (Some(w), Some(s)) if w == s => vec![Outcome::Ok],
                        (Some(_), Some(_)) => vec![Outcome::Mismatch],
                        (Some(_), None) => vec![Outcome::Ok, Outcome::Mismatch],
                    },
                }
            }
            Action::DmaCopy(Guest { command: c, .. }) => {
                let (src, dst, len) = (c.gpa.0, c.to.0, c.size.0);
                let (Some(src_end), Some(dst_end)) = (src.checked_add(len), dst.checked_add(len))
                else {
                    return vec![Outcome::DmaInvalid];
                };
                // Snapshot of the source, page by page, before any write.
                let aligned = src % PAGE == 0 && dst % PAGE == 0;
                let srcs: Vec<Content> = pages(src, src_end)
                    .map(|(p, _)| self.content_at(p).map_or(Content::Unknown, |c| c.0))
                    .collect();
                let overlap = src < dst_end && dst < src_end;
                self.dma(Some((src, src_end)), Some((dst, dst_end)), |page, whole| {
                    if !aligned || !whole || overlap {
                        return Content::Unknown;
                    }
                    srcs.get(((page - dst) / PAGE) as usize)
                        .copied()
                        .unwrap_or(Content::Unknown)
                })
                .map_or_else(|o| vec![o], |_| vec![Outcome::Ok])
            }
            _ => vec![Outcome::Ok],
        }
    }

    /// The wrapping sum of the words of `[a, b)`, if every page is known and
    /// the range is whole pages.
    pub fn checksum(&self, a: u64, b: u64) -> Option<u64> {
        if a % PAGE != 0 || b % PAGE != 0 {
            return None;
        }
        pages(a, b).try_fold(0u64, |acc, (p, _)| {
            Some(acc.wrapping_add(self.content_at(p)?.0.sum()?))
        })
    }

    /// A DMA transfer: validity, the engine's pins (source for reading,
    /// destination for writing, both charged), then the writes.
    fn dma(
        &mut self,
        src: Option<(u64, u64)>,
        dst: Option<(u64, u64)>,
        content: impl Fn(u64, bool) -> Content,
    ) -> Result<(), Outcome> {
        let len = src.or(dst).map_or(0, |r| r.1 - r.0);
        if len == 0 || len % 8 != 0 || [src, dst].iter().flatten().any(|r| r.0 % 8 != 0) {
            return Err(Outcome::DmaInvalid);
        }
        let span = |r: (u64, u64)| (r.0 - r.0 % PAGE, r.1.div_ceil(PAGE) * PAGE);
        let mut charged = self.pinned_pages();
        for (r, write) in [(src, false), (dst, true)] {
            let Some(r) = r.map(span) else { continue };
            self.walk(r.0, r.1, write).map_err(|_| Outcome::DmaFault)?;
            charged += (r.1 - r.0) / PAGE;
            if charged > self.layout.pin_limit {
                return Err(Outcome::DmaNoPin);
            }
        }
        if let Some((a, b)) = dst {
            for (page, whole) in pages(a, b) {
                if let Some((_, key, _)) = self.content_at(page) {
                    self.set(key, content(page, whole));
                }
                // The IOMMU's dirty bits: every mode, logging or not.
                if self.in_async {
                    self.device_maybe.insert(page / PAGE);
                    self.async_frames.push(page / PAGE);
                } else {
                    self.device_dirty.insert(page / PAGE);
                }
            }
            // The 2 MiB leaves written, each once (after the written frames
            // are dirty: a leaf's other frames are maybe dirty).
            let mut covered = (0, 0);
            for (page, _) in pages(a, b) {
                if !(covered.0..covered.1).contains(&page) {
                    covered = self.note_huge_leaf_write(page);
                }
            }
        }
        Ok(())
    }
}
