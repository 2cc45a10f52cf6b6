//! The input format before plug-many, guest and DMA steps (until
//! 2026-12-07), kept to convert inputs written in it: [`convert`] decodes
//! an input as this format did and encodes the same steps and failure
//! points in the current one. Its decoding to actions is the old code,
//! unchanged, so the tests compare the old and the new decoder's actions.
//!
//! ```text
//! VMM_CONVERT_CORPUS=fuzz/corpus/memslots \
//!     cargo test -p vmm --lib convert_the_corpus_from_v1 -- --ignored
//! ```

use arbitrary::{Arbitrary, Unstructured};

use super::encode::encode;
use super::{Addr, Size, ARENA, HUGE, MAX_GPA, PAGE};
use crate::scenario::num::Num;
use crate::scenario::step::{self, Access, Action};

/// One step.
#[derive(Debug, Arbitrary)]
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
}

/// A whole input: steps and failure points (step, call offset).
#[derive(Debug, Arbitrary)]
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
    }
}

/// The actions and failure points `data` decodes to in this format (the
/// old `bytes::decode`).
pub(super) fn decode(data: &[u8]) -> (Vec<Action>, Vec<(usize, usize)>) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return (Vec::new(), Vec::new());
    };
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

/// The same step in the current format.
fn upgrade(op: Op) -> super::Op {
    use super::Op as New;
    match op {
        Op::Plug {
            at,
            size,
            backing,
            flags,
        } => New::Plug {
            at,
            size,
            backing,
            flags,
        },
        Op::Unplug { at, size } => New::Unplug { at, size },
        Op::Protect { at, size, ro } => New::Protect { at, size, ro },
        Op::Move { at, size, to } => New::Move { at, size, to },
        Op::Resize { at, size } => New::Resize { at, size },
        Op::DirtyLog { at, size, on } => New::DirtyLog { at, size, on },
        Op::DirtyPages { at, size } => New::DirtyPages { at, size },
        Op::Pin {
            name,
            at,
            size,
            revocable,
            write,
        } => New::Pin {
            name,
            at,
            size,
            revocable,
            write,
        },
        Op::Unpin { name } => New::Unpin { name },
        Op::Check => New::Check,
    }
}

/// `data`, an input in this format, as an input of the current one with
/// the same steps and failure points.
pub(super) fn convert(data: &[u8]) -> Vec<u8> {
    let input = Input::arbitrary_take_rest(Unstructured::new(data))
        .expect("every input decodes (arbitrary fills missing bytes with zeros)");
    encode(&super::Input {
        ops: input.ops.into_iter().map(upgrade).collect(),
        faults: input.faults,
    })
}
