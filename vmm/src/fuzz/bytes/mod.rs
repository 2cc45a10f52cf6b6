//! The coverage-guided tier's input format: libFuzzer's bytes decoded with
//! `arbitrary` into up to 64 steps (memory ops, pins, plug-many near the
//! slot budget, guest writes and DMA transfers, at arena pages and huge
//! pages, slot edges, special addresses, raw 64-bit values) plus the points
//! where a memslot change fails, run by
//! [`sim::run_reusing`](super::sim::run_reusing) on one simulated VM per
//! thread reset between inputs (every invariant but the locked pages,
//! which cost more than a whole input).
//! The libFuzzer target (`fuzz/fuzz_targets/memslots.rs`) is [`run`];
//! `cargo test` replays the committed corpus through it, and
//! [`scenario`] turns any input into a scenario file for real KVM.
//!
//! The format changes by conversion, not by accident: `arbitrary` picks an
//! enum's variant from the number of variants, so a new step kind re-maps
//! every committed input. The tests keep an encoder (the inverse of
//! `arbitrary`'s decoding of these types, `encode`) and the format before
//! the last change (`v1`), and convert the committed corpus so each input
//! decodes to the same actions and failure points as before.
//!
//! ```
//! // Any bytes decode; these plug and unplug nothing harmful.
//! vmm::fuzz::bytes::run(&[0u8; 32]).unwrap();
//! ```

use arbitrary::{Arbitrary, Unstructured};
use guest_image::protocol::layout as guest_layout;

use super::model::slots::Limits;
use super::model::Layout;
use crate::scenario::num::Num;
use crate::scenario::step::{self, Access, Action, Guest};
use crate::scenario::Scenario;

#[cfg(test)]
mod encode;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod v1;

const ARENA: u64 = 0x1_0000_0000;
const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const MAX_GPA: u64 = 1 << 48;

/// An address: an arena page or huge page, a special address, or raw.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
enum Addr {
    Page(u16),
    Huge(u8),
    Special(u8),
    Raw(u64),
}

/// A size: pages, huge pages or raw.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
enum Size {
    Pages(u8),
    Huge(u8),
    Raw(u64),
}

/// Where a guest command or a DMA transfer starts: in the arena, which the
/// vCPUs and the device reach on real KVM too (never the guest's own
/// memory), at a page, a huge page, or a huge page's last page (a slot's
/// last page when slots are huge pages; a longer range runs into the next).
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
enum Place {
    Page(u16),
    Huge(u8),
    HugeEnd(u8),
}

/// A DMA transfer of the simulated device (synchronous, as the simulated
/// VM runs it on the timeline's thread), 1 to 16 pages.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
enum Dma {
    Fill { at: Place, pages: u8, value: u8 },
    Copy { at: Place, pages: u8, to: Place },
    Checksum { at: Place, pages: u8 },
}

/// One step. Guest commands run on vCPU 0 and synchronously, as the
/// simulated VM runs them (a vCPU's write as KVM's fault path sees it, no
/// vCPU thread), and only those that write (fill, write, touch for
/// writing): the simulated VM has no vCPU to read with, so a read, verify
/// or read touch would be skipped while the model judges it.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
enum Op {
    Plug {
        at: Addr,
        size: Size,
        backing: u8,
        flags: u8,
    },
    Unplug {
        at: Addr,
        size: Size,
    },
    Protect {
        at: Addr,
        size: Size,
        ro: bool,
    },
    Move {
        at: Addr,
        size: Size,
        to: Addr,
    },
    Resize {
        at: Addr,
        size: Size,
    },
    DirtyLog {
        at: Addr,
        size: Size,
        on: bool,
    },
    DirtyPages {
        at: Addr,
        size: Size,
    },
    Pin {
        name: u8,
        at: Addr,
        size: Size,
        revocable: bool,
        write: bool,
    },
    Unpin {
        name: u8,
    },
    Check,
    /// One-page slots two pages apart from `at` less `below` (0-3) times
    /// two pages: with `below` k and more than k slots, slot k + 1 lands on
    /// whatever a plug at `at` left, and the whole batch must be refused.
    /// `count` ([`count`]): mostly a few slots, one time in eight about the
    /// arena's free slots or all of them.
    PlugMany {
        at: Addr,
        below: u8,
        count: u8,
    },
    Fill {
        at: Place,
        pages: u8,
        seed: u8,
    },
    Write {
        at: Place,
        word: u16,
    },
    Touch {
        at: Place,
        pages: u8,
        stride: u8,
    },
    /// One variant for the three transfers: each costs a pin (an `mlock`)
    /// and an unpin, more than a whole memory op, so they come about as
    /// often as a plug-many (the seeded sim tier's weights are alike).
    Dma(Dma),
}

/// A whole input: steps and failure points (step, call offset).
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
struct Input {
    ops: Vec<Op>,
    faults: Vec<(u8, u8)>,
}

fn addr(a: &Addr) -> u64 {
    match a {
        Addr::Page(n) => ARENA + u64::from(*n) * PAGE,
        Addr::Huge(n) => ARENA + u64::from(*n) * HUGE,
        Addr::Special(n) => [
            0x3000_0000,
            0x2fff_f000,
            0x4000_0000,
            0x4400_0000,
            0x5f_f000,
            0,
            MAX_GPA - PAGE,
            MAX_GPA - HUGE,
            MAX_GPA,
            u64::MAX - PAGE + 1,
        ][usize::from(*n) % 10],
        Addr::Raw(v) => *v,
    }
}

fn size(s: &Size) -> u64 {
    match s {
        Size::Pages(n) => u64::from(*n) * PAGE,
        Size::Huge(n) => u64::from(*n) * HUGE,
        Size::Raw(v) => *v,
    }
}

fn place(p: &Place) -> u64 {
    match p {
        Place::Page(n) => ARENA + u64::from(*n) * PAGE,
        Place::Huge(n) => ARENA + u64::from(*n) * HUGE,
        Place::HugeEnd(n) => ARENA + (u64::from(*n) + 1) * HUGE - PAGE,
    }
}

/// A guest range's length: 1 to 16 pages.
fn pages(n: u8) -> u64 {
    (1 + u64::from(n % 16)) * PAGE
}

/// A plug-many's count: 0 to 8 slots (seven times in eight), 26 to 33
/// (about the 30 slots the layout's budget of 32 leaves free beside the
/// boot region and RAM; above the free slots the batch is refused whole),
/// or every free slot. (A batch of 30 slots costs as much as four whole
/// inputs: the manager's memslot changes, the checks and the reset.)
fn count(n: u8) -> Option<u64> {
    match n {
        0..=223 => Some(u64::from(n % 9)),
        224..=247 => Some(26 + u64::from(n % 8)),
        _ => None,
    }
}

/// A synchronous command of vCPU 0.
fn vcpu0<C>(command: C) -> Guest<C> {
    Guest {
        vcpu: 0,
        repeat: 1,
        is_async: false,
        command,
    }
}

fn action(op: &Op) -> Action {
    let n = Num;
    match op {
        Op::Plug {
            at,
            size: s,
            backing,
            flags,
        } => {
            let mut b = ["anon", "shared", "memfd", "thp", "file"][usize::from(*backing) % 5];
            // A THP plug near 2^64 bytes hits a known overflow (see docs/fuzzing.md).
            if b == "thp" && size(s) > 1 << 40 {
                b = "anon";
            }
            let flags = match flags % 4 {
                0 => None,
                1 => Some(vec!["readonly".to_string()]),
                2 => Some(vec!["dirty-log".to_string()]),
                _ => Some(vec!["readonly".to_string(), "dirty-log".to_string()]),
            };
            Action::Plug(step::Plug {
                gpa: n(addr(at)),
                size: n(size(s)),
                backing: Some(b.into()),
                flags,
            })
        }
        Op::Unplug { at, size: s } => Action::Unplug(step::Unplug {
            gpa: n(addr(at)),
            size: n(size(s)),
        }),
        Op::Protect { at, size: s, ro } => Action::Protect(step::Protect {
            gpa: n(addr(at)),
            size: n(size(s)),
            access: if *ro { Access::Ro } else { Access::Rw },
        }),
        Op::Move { at, size: s, to } => Action::Move(step::Move {
            gpa: n(addr(at)),
            size: n(size(s)),
            to: n(addr(to)),
        }),
        Op::Resize { at, size: s } => Action::Resize(step::Resize {
            gpa: n(addr(at)),
            new_size: n(size(s)),
        }),
        Op::DirtyLog { at, size: s, on } => Action::DirtyLog(step::DirtyLog {
            gpa: n(addr(at)),
            size: n(size(s)),
            on: *on,
        }),
        Op::DirtyPages { at, size: s } => Action::DirtyPages(step::DirtyPages {
            gpa: n(addr(at)),
            size: n(size(s)),
            pages: None,
            maybe_pages: None,
        }),
        Op::Pin {
            name,
            at,
            size: s,
            revocable,
            write,
        } => Action::Pin(step::Pin {
            name: format!("p{}", name % 8),
            gpa: n(addr(at)),
            size: n(size(s).min(1 << 30)),
            revocable: Some(*revocable),
            write: Some(*write),
        }),
        Op::Unpin { name } => Action::Unpin(step::Unpin {
            name: format!("p{}", name % 8),
        }),
        Op::Check => Action::Check(step::Check { pages: None }),
        Op::PlugMany {
            at,
            below,
            count: c,
        } => Action::PlugMany(step::PlugMany {
            gpa: n(addr(at).wrapping_sub(2 * PAGE * u64::from(below % 4))),
            count: count(*c).map(n),
        }),
        Op::Fill { at, pages: p, seed } => Action::Fill(vcpu0(step::Fill {
            gpa: n(place(at)),
            size: n(pages(*p)),
            seed: n(u64::from(*seed)),
            origin: None,
        })),
        Op::Write { at, word } => Action::Write(vcpu0(step::Write {
            gpa: n(place(at) + 8 * u64::from(word % 512)),
            value: n(u64::from(*word)),
        })),
        Op::Touch {
            at,
            pages: p,
            stride,
        } => Action::Touch(vcpu0(step::Touch {
            gpa: n(place(at)),
            size: n(pages(*p)),
            // Page by page, every other page, several writes to a page,
            // and a stride that walks across page offsets.
            stride: Some(n([PAGE, 2 * PAGE, 512, PAGE + 8][usize::from(stride % 4)])),
            write: Some(true),
        })),
        Op::Dma(d) => dma(d),
    }
}

fn dma(d: &Dma) -> Action {
    let n = Num;
    match d {
        Dma::Fill {
            at,
            pages: p,
            value,
        } => Action::DmaFill(vcpu0(step::DmaFill {
            gpa: n(place(at)),
            size: n(pages(*p)),
            value: n(u64::from(*value)),
        })),
        Dma::Copy { at, pages: p, to } => Action::DmaCopy(vcpu0(step::DmaCopy {
            gpa: n(place(at)),
            to: n(place(to)),
            size: n(pages(*p)),
        })),
        // No expected sum: the simulated VM's guest writes mark pages
        // dirty but store nothing, so only the DMA's own writes are in
        // memory (a converted scenario's sum is left unchecked likewise).
        Dma::Checksum { at, pages: p } => Action::DmaChecksum(vcpu0(step::DmaChecksum {
            gpa: n(place(at)),
            size: n(pages(*p)),
            value: None,
        })),
    }
}

/// The simulated VM every input runs on.
pub fn layout() -> Layout {
    Layout {
        dirty_log: crate::mm::manager::DirtyLogMode::Bitmap,
        boot_end: guest_layout::BOOT_SIZE,
        ram: (guest_layout::RAM_BASE, 64 << 20),
        limits: Limits {
            max_gpa: MAX_GPA,
            max_slots: 32,
            reserved: (0x3000_0000, 0x3000_1000),
            read_only: true,
        },
        pin_limit: 4096,
        vcpus: 1,
        guest_end: 64 << 30,
    }
}

/// The actions and failure points an input's steps and failure points
/// make (steps the scenario reader would refuse are dropped).
fn actions(input: &Input) -> (Vec<Action>, Vec<(usize, usize)>) {
    let actions: Vec<Action> = input
        .ops
        .iter()
        .take(64)
        .map(action)
        .filter(|a| a.check().is_ok())
        .collect();
    let faults = input
        .faults
        .iter()
        .map(|&(s, o)| (usize::from(s), usize::from(o % 8)))
        .collect();
    (actions, faults)
}

/// The actions and failure points `data` decodes to (steps the scenario
/// reader would refuse are dropped).
pub fn decode(data: &[u8]) -> (Vec<Action>, Vec<(usize, usize)>) {
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => actions(&input),
        Err(_) => (Vec::new(), Vec::new()),
    }
}

/// Runs one input on the simulated VM in lockstep with the model: the
/// number of steps it ran, or `Err` describing a finding (the step, what was
/// expected, what happened). The VM is one per thread, reset between inputs
/// ([`run_reusing`](super::sim::run_reusing)).
pub fn run(data: &[u8]) -> Result<usize, String> {
    let (actions, faults) = decode(data);
    let options = super::sim::SimOptions {
        faults: &faults,
        guard_reader: false,
        locked_pages: false,
        ..Default::default()
    };
    match super::sim::run_reusing(&layout(), &actions, &options) {
        Ok(None) => Ok(actions.len()),
        Ok(Some(f)) => Err(format!(
            "finding at step {} ({}): expected {}, got {}",
            f.step, f.what, f.expected, f.actual
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The input as a scenario file for `vmm run --scenario` on real KVM: its
/// steps with the model's predictions (on the real VM's layout, `layout`)
/// as expectations. Failure points have no equivalent there and are left
/// out.
pub fn scenario(data: &[u8], layout: &Layout, title: &str) -> Scenario {
    let (actions, _) = decode(data);
    let steps = super::timeline::expectations(layout, &actions);
    super::real::scenario(title, "converted from a libFuzzer input", layout, steps)
}
