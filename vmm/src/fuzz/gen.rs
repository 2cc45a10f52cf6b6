//! The generator: a seeded stream of typed scenario actions biased toward
//! where memory-hotplug bugs live (slot edges, a slot's last page, 4 KiB vs
//! 2 MiB alignment, touching neighbours, ranges spanning slots and holes, the
//! register page, the top of the guest-physical window, the slot budget,
//! zero, misaligned and wrapping arguments). It reads the model's state to
//! aim, never to judge: the model predicts every outcome afterwards.

use crate::scenario::num::Num;
use crate::scenario::pages::DirtyWant;
use crate::scenario::step::{self, Access, Action, Guest};

use super::model::slots::PAGE;
use super::model::{Model, HUGE};

pub use super::weights::Weights;

/// A small, fast, seeded generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x6A09_E667_F3BC_C908)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Where and how the generator aims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenConfig {
    /// First byte of the hotplug arena.
    pub arena_base: u64,
    /// Its length.
    pub arena_size: u64,
    /// Whether guest commands and DMA may be generated (a VM with vCPUs).
    pub guest: bool,
    /// Weights.
    pub weights: Weights,
    /// One-page slots every timeline starts with (one `plug-many` at
    /// [`prefill_base`](Self::prefill_base)), to fuzz with many slots.
    pub prefill: u64,
}

impl GenConfig {
    /// Where the prefilled slots go: 2 GiB above the arena, beyond where any
    /// generated plug lands (every other page, as `plug-many` places them).
    pub fn prefill_base(&self) -> u64 {
        self.arena_base + self.arena_size + (2 << 30)
    }
}

/// The generator; see the module docs.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    cfg: GenConfig,
    pins: u64,
}

fn n(v: u64) -> Num {
    Num(v)
}

fn gc<C>(vcpu: u64, repeat: u64, is_async: bool, command: C) -> Guest<C> {
    Guest {
        vcpu,
        repeat,
        is_async,
        command,
    }
}

impl Generator {
    /// A generator for `seed`.
    pub fn new(seed: u64, cfg: GenConfig) -> Self {
        Self {
            rng: Rng::new(seed),
            cfg,
            pins: 0,
        }
    }

    /// The next action, aimed at `model`'s state.
    pub fn next(&mut self, model: &Model) -> Action {
        let w = self.cfg.weights;
        let guest = self.cfg.guest;
        let table = [
            (w.plug, 0),
            (w.unplug, 1),
            (w.protect, 2),
            (w.moves, 3),
            (w.resize, 4),
            (w.dirty, 5),
            (w.plug_many, 6),
            (w.pins, 7),
            (w.guest, 8),
            (w.dma, 9),
        ];
        let total: u64 = table.iter().map(|t| t.0).sum();
        let mut roll = self.rng.below(total.max(1));
        let mut family = 0;
        for (weight, f) in table {
            if roll < weight {
                family = f;
                break;
            }
            roll -= weight;
        }
        match family {
            0 => self.plug(model),
            1 => {
                let (gpa, size) = self.range(model);
                Action::Unplug(step::Unplug {
                    gpa: n(gpa),
                    size: n(size),
                })
            }
            2 => {
                let (gpa, size) = self.range(model);
                let access = if self.rng.chance(60) {
                    Access::Ro
                } else {
                    Access::Rw
                };
                Action::Protect(step::Protect {
                    gpa: n(gpa),
                    size: n(size),
                    access,
                })
            }
            3 => {
                let (gpa, size) = self.range(model);
                let to = if self.rng.chance(20) {
                    gpa.wrapping_add(self.rng.pick(&[PAGE, size / 2, size]))
                } else {
                    self.addr(model)
                };
                Action::Move(step::Move {
                    gpa: n(gpa),
                    size: n(size),
                    to: n(to),
                })
            }
            4 => self.resize(model),
            5 => {
                let (gpa, size) = self.range(model);
                if self.rng.chance(50) {
                    let on = self.rng.chance(65);
                    Action::DirtyLog(step::DirtyLog {
                        gpa: n(gpa),
                        size: n(size),
                        on,
                    })
                } else {
                    // The exact set the model predicts, and the pages it
                    // cannot be sure of (read faults of a shadow MMU,
                    // async writes in flight, rolled-back ops).
                    let (pages, maybe_pages) = match model.dirty_expectation(gpa, size) {
                        Some((must, maybe)) => (
                            Some(DirtyWant::Set(must)),
                            (!maybe.is_empty()).then_some(maybe),
                        ),
                        None => (None, None),
                    };
                    Action::DirtyPages(step::DirtyPages {
                        gpa: n(gpa),
                        size: n(size),
                        pages,
                        maybe_pages,
                    })
                }
            }
            6 => self.plug_many(model),
            7 => self.pin(model),
            8 if guest => self.guest_command(model),
            8 => self.guest_write(model),
            _ => self.dma(model),
        }
    }

    /// The arena's slots, as (start, end).
    fn arena_slots(&self, model: &Model) -> Vec<(u64, u64)> {
        let (a, b) = (
            self.cfg.arena_base,
            self.cfg.arena_base + self.cfg.arena_size,
        );
        model
            .slots
            .slots
            .values()
            .filter(|s| s.start >= a && s.end() <= b)
            .map(|s| (s.start, s.end()))
            .collect()
    }

    /// An address, biased toward edges.
    fn addr(&mut self, model: &Model) -> u64 {
        let slots = self.arena_slots(model);
        let base = self.cfg.arena_base;
        let l = &model.layout;
        let roll = self.rng.below(100);
        let a = if roll < 35 && !slots.is_empty() {
            let (s, e) = slots[self.rng.below(slots.len() as u64) as usize];
            let edge = self.rng.pick(&[s, e, e.saturating_sub(PAGE), s + PAGE]);
            let nudge = self.rng.pick(&[0, 0, 0, PAGE, HUGE]);
            if self.rng.chance(50) {
                edge.saturating_sub(nudge)
            } else {
                edge.saturating_add(nudge)
            }
        } else if roll < 85 {
            let pages = self.cfg.arena_size / PAGE;
            let p = base + self.rng.below(pages) * PAGE;
            if self.rng.chance(35) {
                p - (p - base) % HUGE
            } else {
                p
            }
        } else if roll < 95 {
            self.rng.pick(&[
                l.limits.reserved.0,
                l.limits.reserved.0.saturating_sub(PAGE),
                l.ram.0,
                l.ram.0 + l.ram.1,
                l.ram.0 + l.ram.1 - PAGE,
                l.boot_end - PAGE,
                l.boot_end,
                0,
                l.limits.max_gpa - PAGE,
                l.limits.max_gpa,
                l.limits.max_gpa - HUGE,
                u64::MAX - PAGE + 1,
                l.guest_end - PAGE,
            ])
        } else {
            base + self.rng.below(self.cfg.arena_size / PAGE) * PAGE
        };
        if self.rng.chance(4) {
            a.wrapping_add(self.rng.pick(&[1, 8, 0x800]))
        } else {
            a
        }
    }

    /// A size, biased toward pages, huge pages, edges and bad values.
    fn size(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=2 => 0,
            3..=5 => self.rng.pick(&[1, 8, PAGE + 8, HUGE - PAGE / 2]),
            6..=7 => u64::MAX - self.rng.pick(&[0, PAGE - 1, HUGE - 1]),
            8..=35 => HUGE * (1 + self.rng.below(3)),
            _ => PAGE * (1 + self.rng.pick(&[0, 0, 1, 2, 3, 7, 15, 63, 255])),
        }
    }

    /// A range over plugged memory (a slot, part of one, several) or anywhere.
    fn range(&mut self, model: &Model) -> (u64, u64) {
        let slots = self.arena_slots(model);
        if slots.is_empty() || self.rng.chance(25) {
            let a = self.addr(model);
            return (a, self.size());
        }
        let i = self.rng.below(slots.len() as u64) as usize;
        let (s, e) = slots[i];
        match self.rng.below(6) {
            0 => (s, e - s),
            1 => (e - PAGE, PAGE),
            2 => {
                // Across several slots (and the holes between them).
                let j = (i + 1 + self.rng.below(3) as usize).min(slots.len() - 1);
                (s, slots[j].1 - s)
            }
            3 => (s, self.size()),
            4 => {
                let off = self.rng.below((e - s) / PAGE) * PAGE;
                (s + off, (e - s - off).max(PAGE))
            }
            _ => {
                let off = self.rng.below((e - s) / PAGE) * PAGE;
                (s + off, PAGE * (1 + self.rng.below(4)))
            }
        }
    }

    fn plug(&mut self, model: &Model) -> Action {
        let backing = match self.rng.below(10) {
            0..=3 => None,
            4 => Some("anon"),
            5 => Some("shared"),
            6 if self.rng.chance(50) => Some("file"),
            6 => Some("memfd"),
            7 | 8 => Some("thp"),
            _ => Some(if self.rng.chance(20) { "bogus" } else { "anon" }),
        };
        let flags = match self.rng.below(12) {
            0 => Some(vec!["readonly".to_string()]),
            1 | 2 => Some(vec!["dirty-log".to_string()]),
            3 => Some(vec!["readonly".to_string(), "dirty-log".to_string()]),
            4 if self.rng.chance(20) => Some(vec!["sideways".to_string()]),
            _ => None,
        };
        let gpa = self.addr(model);
        let mut size = self.size();
        if size > (64 << 20) && size < u64::MAX - (4 << 20) {
            size = HUGE;
        }
        Action::Plug(step::Plug {
            gpa: n(gpa),
            size: n(size),
            backing: backing.map(str::to_string),
            flags,
        })
    }

    fn resize(&mut self, model: &Model) -> Action {
        let slots = self.arena_slots(model);
        let (gpa, len) = match slots.is_empty() || self.rng.chance(10) {
            true => (self.addr(model), PAGE),
            false => {
                let (s, e) = slots[self.rng.below(slots.len() as u64) as usize];
                (s, e - s)
            }
        };
        let new = match self.rng.below(8) {
            0 => 0,
            1 => len + 8,
            2 => len.saturating_sub(PAGE).max(PAGE),
            3 => len + HUGE,
            4 => len / 2 - (len / 2) % PAGE,
            5 => len,
            _ => len + PAGE * (1 + self.rng.below(4)),
        };
        Action::Resize(step::Resize {
            gpa: n(gpa),
            new_size: n(new),
        })
    }

    fn plug_many(&mut self, model: &Model) -> Action {
        let free = model
            .layout
            .limits
            .max_slots
            .saturating_sub(model.slots.slots.len()) as u64;
        let count = match self.rng.below(10) {
            0 => free + 1,
            1 if free <= 4096 => free,
            2 => 0,
            _ => 1 + self.rng.below(8),
        };
        // A free stretch: past the last slot of the arena and the gigabyte
        // above it (no plug lands further up but at the special addresses),
        // or misaligned on purpose.
        let top = model
            .slots
            .slots
            .range(self.cfg.arena_base..self.cfg.arena_base + self.cfg.arena_size + (1 << 30))
            .map(|(_, s)| s.end())
            .max()
            .unwrap_or(self.cfg.arena_base);
        let mut gpa = top + PAGE * (1 + self.rng.below(4));
        if self.rng.chance(10) {
            gpa += 8;
        }
        let slots = self.arena_slots(model);
        if !slots.is_empty() && self.rng.chance(30) {
            // Slot k of the batch lands on an existing slot: the whole
            // plug-many must be refused and change nothing.
            let (start, _) = slots[self.rng.below(slots.len() as u64) as usize];
            let k = 1 + self.rng.below(3);
            return Action::PlugMany(step::PlugMany {
                gpa: n(start.saturating_sub(2 * PAGE * k)),
                count: Some(n(k + 2)),
            });
        }
        Action::PlugMany(step::PlugMany {
            gpa: n(gpa),
            count: Some(n(count)),
        })
    }

    fn pin(&mut self, model: &Model) -> Action {
        // An async DMA holds pins: collect it first so pin counts and the
        // pin limit are known.
        if let Some(vcpu) = model
            .dma_in_flight()
            .then(|| model.pending_vcpus())
            .and_then(|v| v.first().copied())
        {
            return Action::Wait(step::Wait::collect(vcpu));
        }
        let names: Vec<String> = model.pins.keys().cloned().collect();
        match self.rng.below(10) {
            0..=2 if !names.is_empty() => {
                let name = names[self.rng.below(names.len() as u64) as usize].clone();
                Action::Unpin(step::Unpin { name })
            }
            3 => Action::Unpin(step::Unpin {
                name: "nobody".into(),
            }),
            // The full consistency check of a `check` step probes every
            // slot id KVM allows (32,764 ioctls, 0.2-0.6 s at 30,000
            // slots): with thousands of slots it comes one time in eight,
            // while the incremental check still runs after every op.
            4 if model.slots.slots.len() <= 4096 || self.rng.chance(12) => {
                Action::Check(step::Check {
                    pages: Some(model.pinned_pages()),
                })
            }
            _ => {
                let (gpa, mut size) = self.range(model);
                if self.rng.chance(5) {
                    size = (model.layout.pin_limit + 1) * PAGE;
                }
                self.pins += 1;
                let name = if !names.is_empty() && self.rng.chance(10) {
                    names[0].clone()
                } else {
                    format!("p{}", self.pins)
                };
                Action::Pin(step::Pin {
                    name,
                    gpa: n(gpa),
                    size: n(size),
                    revocable: Some(self.rng.chance(60)),
                    write: Some(self.rng.chance(70)),
                })
            }
        }
    }

    /// A page-aligned range inside the arena (so guest commands stay in the
    /// guest's reach and off the boot region and RAM), mostly over slots.
    fn guest_range(&mut self, model: &Model) -> (u64, u64) {
        let slots = self.arena_slots(model);
        let (a, b) = (
            self.cfg.arena_base,
            self.cfg.arena_base + self.cfg.arena_size,
        );
        let (gpa, size) = if slots.is_empty() || self.rng.chance(15) {
            (a + self.rng.below(self.cfg.arena_size / PAGE) * PAGE, PAGE)
        } else {
            let (s, e) = slots[self.rng.below(slots.len() as u64) as usize];
            let pages = (e - s) / PAGE;
            let off = self.rng.below(pages);
            let len = 1 + self.rng.below((pages - off).min(8));
            // Sometimes one page further: into the neighbour or a hole.
            let extra = u64::from(self.rng.chance(15));
            (s + off * PAGE, (len + extra) * PAGE)
        };
        (gpa, size.min(b - gpa))
    }

    fn vcpu(&mut self, model: &Model) -> u64 {
        self.rng.below(model.layout.vcpus)
    }

    fn guest_command(&mut self, model: &Model) -> Action {
        let vcpu = self.vcpu(model);
        if model.has_pending(vcpu) {
            return Action::Wait(step::Wait::collect(vcpu));
        }
        let (gpa, size) = self.guest_range(model);
        let seed = self.rng.below(1 << 32);
        let is_async = self.rng.chance(15);
        let (v, repeat) = (vcpu, 1 + u64::from(self.rng.chance(10)));
        match self.rng.below(10) {
            0..=2 => Action::Fill(gc(
                v,
                repeat,
                is_async,
                step::Fill {
                    gpa: n(gpa),
                    size: n(size),
                    seed: n(seed),
                    origin: None,
                },
            )),
            3 | 4 => self.verify_known(model, v, is_async).unwrap_or_else(|| {
                Action::VerifyConst(gc(
                    v,
                    repeat,
                    is_async,
                    step::VerifyConst {
                        gpa: n(gpa),
                        size: n(size),
                        value: n(0),
                    },
                ))
            }),
            5 => Action::Touch(gc(
                v,
                repeat,
                is_async,
                step::Touch {
                    gpa: n(gpa),
                    size: n(size),
                    stride: self
                        .rng
                        .chance(30)
                        .then_some(n(self.rng.pick(&[8, 512, 8192]))),
                    write: Some(false),
                },
            )),
            6 => Action::Touch(gc(
                v,
                repeat,
                is_async,
                step::Touch {
                    gpa: n(gpa),
                    size: n(size),
                    stride: None,
                    write: Some(true),
                },
            )),
            7 => {
                let off = self.rng.below(PAGE / 8) * 8;
                let at = gpa + off.min(size - 8);
                let value = model
                    .content_at(at - at % PAGE)
                    .and_then(|(c, _, _)| c.word(at % PAGE));
                Action::Read(gc(
                    v,
                    repeat,
                    is_async,
                    step::Read {
                        gpa: n(at),
                        value: value.map(n),
                    },
                ))
            }
            8 => Action::Write(gc(
                v,
                repeat,
                is_async,
                step::Write {
                    gpa: n(gpa + 8 * self.rng.below(PAGE / 8).min(size / 8 - 1)),
                    value: n(seed),
                },
            )),
            _ => Action::Spin(gc(
                v,
                repeat,
                false,
                step::Spin {
                    iterations: n(1 + self.rng.below(1000)),
                },
            )),
        }
    }

    /// Without vCPUs: a guest write the sim tier simulates (fill, write,
    /// touch for writing), so the dirty log has something to report.
    fn guest_write(&mut self, model: &Model) -> Action {
        let (gpa, size) = self.guest_range(model);
        let seed = self.rng.below(1 << 32);
        match self.rng.below(3) {
            0 => Action::Fill(gc(
                0,
                1,
                false,
                step::Fill {
                    gpa: n(gpa),
                    size: n(size),
                    seed: n(seed),
                    origin: None,
                },
            )),
            1 => Action::Write(gc(
                0,
                1,
                false,
                step::Write {
                    gpa: n(gpa + 8 * self.rng.below(size / 8)),
                    value: n(seed),
                },
            )),
            _ => Action::Touch(gc(
                0,
                1,
                false,
                step::Touch {
                    gpa: n(gpa),
                    size: n(size),
                    stride: Some(n(self.rng.pick(&[8, PAGE, 2 * PAGE]))),
                    write: Some(true),
                },
            )),
        }
    }

    /// A verify of a run of pages whose content the model knows.
    pub fn verify_known(&mut self, model: &Model, vcpu: u64, is_async: bool) -> Option<Action> {
        use super::model::guest::Content;
        let (a, b) = (
            self.cfg.arena_base,
            self.cfg.arena_base + self.cfg.arena_size,
        );
        let known: Vec<u64> = model
            .slots
            .slots
            .values()
            .filter(|s| s.start >= a && s.end() <= b)
            .flat_map(|s| (s.start..s.end()).step_by(PAGE as usize))
            .collect();
        if known.is_empty() {
            return None;
        }
        let start = known[self.rng.below(known.len() as u64) as usize];
        verify_run(model, start, 16, vcpu, is_async)
            .filter(|_| !matches!(model.content_at(start), Some((Content::Unknown, _, _))))
    }

    fn dma(&mut self, model: &Model) -> Action {
        let vcpu = self.vcpu(model);
        if model.has_pending(vcpu) {
            return Action::Wait(step::Wait::collect(vcpu));
        }
        let (gpa, size) = self.guest_range(model);
        // Async (real tier): memory ops, dirty-log switches and reports race
        // the transfer until its `wait`.
        let is_async = self.cfg.guest && self.rng.chance(20);
        match self.rng.below(3) {
            0 => Action::DmaFill(gc(
                vcpu,
                1,
                is_async,
                step::DmaFill {
                    gpa: n(gpa),
                    size: n(size),
                    value: n(self.rng.next_u64()),
                },
            )),
            1 => {
                // The sim tier's guest writes dirty pages but store
                // nothing: contents are checked on real KVM only.
                let sum = model.checksum(gpa, gpa + size).filter(|_| self.cfg.guest);
                // Async: memory ops race the transfer until its `wait`.
                Action::DmaChecksum(gc(
                    vcpu,
                    1,
                    self.cfg.guest && self.rng.chance(30),
                    step::DmaChecksum {
                        gpa: n(gpa),
                        size: n(size),
                        value: sum.map(n),
                    },
                ))
            }
            _ => {
                let (to, _) = self.guest_range(model);
                let to = to.min(self.cfg.arena_base + self.cfg.arena_size - size);
                Action::DmaCopy(gc(
                    vcpu,
                    1,
                    is_async,
                    step::DmaCopy {
                        gpa: n(gpa),
                        to: n(to),
                        size: n(size),
                    },
                ))
            }
        }
    }
}

/// A `verify` (or `verify-const`) of the run of pages from `start` (at most
/// `max` pages) whose contents continue one pattern or value, as the model
/// knows them; `None` if the page is unplugged or unknown.
pub fn verify_run(
    model: &Model,
    start: u64,
    max: u64,
    vcpu: u64,
    is_async: bool,
) -> Option<Action> {
    use super::model::guest::Content;
    let (first, _, _) = model.content_at(start)?;
    let mut len = 1;
    while len < max {
        let next = start + len * PAGE;
        let same = match (first, model.content_at(next)) {
            (
                Content::Pattern { seed, base },
                Some((Content::Pattern { seed: s, base: b }, _, _)),
            ) => s == seed && b == base.wrapping_add(len * PAGE),
            (c, Some((d, _, _))) => {
                c == d && c != Content::Unknown && !matches!(c, Content::Pattern { .. })
            }
            _ => false,
        };
        if !same {
            break;
        }
        len += 1;
    }
    let (gpa, size) = (n(start), n(len * PAGE));
    match first {
        Content::Pattern { seed, base } => Some(Action::Verify(gc(
            vcpu,
            1,
            is_async,
            step::Verify {
                gpa,
                size,
                seed: n(seed),
                origin: (base != start).then_some(n(base)),
            },
        ))),
        Content::Zero => Some(Action::VerifyConst(gc(
            vcpu,
            1,
            is_async,
            step::VerifyConst {
                gpa,
                size,
                value: n(0),
            },
        ))),
        Content::Word(v) => Some(Action::VerifyConst(gc(
            vcpu,
            1,
            is_async,
            step::VerifyConst {
                gpa,
                size,
                value: n(v),
            },
        ))),
        Content::Unknown => None,
    }
}
