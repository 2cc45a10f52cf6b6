//! Random op sequences (failed ops included) against a page-granular
//! reference model: one entry per 4 KiB page of a small guest-physical
//! window. After every op the map must agree with the model on success or
//! failure, on every page's translation and flags, on its slot count (maximal
//! merging), on `discards`/`added`/`removed`, and its `changes` must replay on
//! a simulated KVM memslot table (and roll back).

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::mm::slot_map::{ChangeKind, SlotMapError};

/// Guest-physical window, in pages (also the map's `max_gpa`).
const PAGES: u64 = 32;
/// Pages per test mapping.
const MAP_PAGES: u64 = 16;
/// Test mappings an op can use; index `NMAPS` is the fixed boot mapping.
const NMAPS: usize = 3;
const BOOT: usize = NMAPS;
/// The fixed boot slot: pages `[BOOT_AT, BOOT_AT + 2)`.
const BOOT_AT: u64 = 14;
const MAX_SLOTS: u32 = 7;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Page {
    m: usize,
    off: u64,
    ro: bool,
    dl: bool,
    fixed: bool,
    /// The page's mapping chain (see `Slot::chain`); not compared with the
    /// map's numbers, only used to decide what a resize covers.
    chain: u64,
}

#[derive(Clone, Debug)]
enum Op {
    Plug {
        gpa: u64,
        n: u64,
        m: usize,
        off: u64,
        ro: bool,
        dl: bool,
    },
    Unplug {
        gpa: u64,
        n: u64,
    },
    Protect {
        gpa: u64,
        n: u64,
        ro: bool,
    },
    DirtyLog {
        gpa: u64,
        n: u64,
        on: bool,
    },
    Move {
        gpa: u64,
        n: u64,
        dst: u64,
    },
    Resize {
        gpa: u64,
        n: u64,
        grow: Option<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly in-window, non-empty ranges; sometimes empty or past the end.
    let g = || prop_oneof![6 => 0..PAGES - 4, 1 => PAGES - 4..PAGES + 2];
    // Ops on existing memory mostly start at a slot's start (see `resolve`).
    let at = || prop_oneof![1 => 0..PAGES, 2 => SLOT_REF..SLOT_REF + 8];
    let n = || prop_oneof![1 => Just(0u64), 30 => 1..7u64];
    prop_oneof![
        4 => (g(), n(), 0..NMAPS, 0..MAP_PAGES - 2, any::<bool>(), any::<bool>())
            .prop_map(|(gpa, n, m, off, ro, dl)| Op::Plug { gpa, n, m, off, ro, dl }),
        2 => (at(), n()).prop_map(|(gpa, n)| Op::Unplug { gpa, n }),
        1 => (at(), n(), any::<bool>()).prop_map(|(gpa, n, ro)| Op::Protect { gpa, n, ro }),
        1 => (at(), n(), any::<bool>()).prop_map(|(gpa, n, on)| Op::DirtyLog { gpa, n, on }),
        1 => (at(), n(), g()).prop_map(|(gpa, n, dst)| Op::Move { gpa, n, dst }),
        1 => (at(), prop_oneof![1 => Just(0u64), 20 => 1..9u64], proptest::option::of(0..NMAPS))
            .prop_map(|(gpa, n, grow)| Op::Resize { gpa, n, grow }),
    ]
}

type Model = Vec<Option<Page>>;

/// A `gpa` of `SLOT_REF + k` in a generated op means "the start of the k-th
/// slot (mod the slot count)", so ops on existing memory often hit some.
const SLOT_REF: u64 = 1000;

/// Replaces slot references in `op` by page numbers, from the model's state.
fn resolve(pages: &Model, op: &Op) -> Op {
    // The fixed boot slot is referenced only rarely (k = 7).
    let starts: Vec<u64> = (0..pages.len())
        .filter(|&i| {
            pages[i].is_some_and(|p| !p.fixed) && (i == 0 || !continues(pages[i - 1], pages[i]))
        })
        .map(|i| i as u64)
        .collect();
    let fix = |gpa: u64| match gpa.checked_sub(SLOT_REF) {
        Some(7) => BOOT_AT,
        Some(k) if !starts.is_empty() => starts[k as usize % starts.len()],
        Some(_) => 0,
        None => gpa,
    };
    match op.clone() {
        Op::Unplug { gpa, n } => Op::Unplug { gpa: fix(gpa), n },
        Op::Protect { gpa, n, ro } => Op::Protect {
            gpa: fix(gpa),
            n,
            ro,
        },
        Op::DirtyLog { gpa, n, on } => Op::DirtyLog {
            gpa: fix(gpa),
            n,
            on,
        },
        Op::Move { gpa, n, dst } => Op::Move {
            gpa: fix(gpa),
            n,
            dst,
        },
        Op::Resize { gpa, n, grow } => Op::Resize {
            gpa: fix(gpa),
            n,
            grow,
        },
        plug => plug,
    }
}

/// Whether page `b` continues page `a` within one (maximally merged) slot.
fn continues(a: Option<Page>, b: Option<Page>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) if a.fixed || b.fixed => a.fixed && b.fixed,
        (Some(a), Some(b)) => a.m == b.m && a.off + 1 == b.off && a.ro == b.ro && a.dl == b.dl,
        _ => false,
    }
}

fn slot_count(pages: &Model) -> usize {
    (0..pages.len())
        .filter(|&i| pages[i].is_some() && (i == 0 || !continues(pages[i - 1], pages[i])))
        .count()
}

fn host_used(pages: &Model, m: usize, off: u64) -> bool {
    pages.iter().flatten().any(|p| p.m == m && p.off == off)
}

fn span(gpa: u64, n: u64) -> std::ops::Range<usize> {
    gpa as usize..(gpa + n) as usize
}

/// Slots that merge become one mapping: every page of a (maximally merged)
/// slot takes the chain of the slot's first page.
fn merge_chains(pages: &mut Model) {
    for i in 1..pages.len() {
        if continues(pages[i - 1], pages[i]) {
            if let (Some(prev), Some(p)) = (pages[i - 1], pages[i].as_mut()) {
                p.chain = prev.chain;
            }
        }
    }
}

/// The model's verdict: the pages after the op, or `None` if it must fail.
/// A plug starts chain `fresh`.
fn model_apply(pages: &Model, op: &Op, fresh: u64) -> Option<Model> {
    let mut new = pages.clone();
    let in_window = |gpa: u64, n: u64| n > 0 && gpa + n <= PAGES;
    let all = |r: std::ops::Range<usize>, f: &dyn Fn(Option<Page>) -> bool| {
        pages[r].iter().all(|p| f(*p))
    };
    match *op {
        Op::Plug {
            gpa,
            n,
            m,
            off,
            ro,
            dl,
        } => {
            if !in_window(gpa, n) || off + n > MAP_PAGES || !all(span(gpa, n), &|p| p.is_none()) {
                return None;
            }
            if (off..off + n).any(|o| host_used(pages, m, o)) {
                return None;
            }
            for (i, o) in span(gpa, n).zip(off..) {
                new[i] = Some(Page {
                    m,
                    off: o,
                    ro,
                    dl,
                    fixed: false,
                    chain: fresh,
                });
            }
        }
        Op::Unplug { gpa, n } => {
            if !in_window(gpa, n) || all(span(gpa, n), &|p| p.is_none()) {
                return None;
            }
            if !all(span(gpa, n), &|p| p.is_none_or(|p| !p.fixed)) {
                return None;
            }
            span(gpa, n).for_each(|i| new[i] = None);
        }
        Op::Protect { gpa, n, ro: flag } | Op::DirtyLog { gpa, n, on: flag } => {
            if !in_window(gpa, n) || !all(span(gpa, n), &|p| p.is_some_and(|p| !p.fixed)) {
                return None;
            }
            for p in new[span(gpa, n)].iter_mut().flatten() {
                if matches!(op, Op::Protect { .. }) {
                    p.ro = flag;
                } else {
                    p.dl = flag;
                }
            }
        }
        Op::Move { gpa, n, dst } => {
            if !in_window(gpa, n) || !in_window(dst, n) || (dst < gpa + n && gpa < dst + n) {
                return None;
            }
            if !all(span(gpa, n), &|p| p.is_some_and(|p| !p.fixed))
                || !all(span(dst, n), &|p| p.is_none())
            {
                return None;
            }
            span(gpa, n).for_each(|i| new[i] = None);
            for (s, d) in span(gpa, n).zip(span(dst, n)) {
                new[d] = pages[s];
            }
        }
        Op::Resize { gpa, n, grow } => {
            let start = gpa as usize;
            let first = *pages.get(start)?;
            if first.is_none() || (start > 0 && continues(pages[start - 1], first)) {
                return None; // No slot starts here.
            }
            let first = first?;
            // The mapping: the pages of first's chain from here, up to a hole.
            let len = (start..pages.len())
                .take_while(|&i| pages[i].is_some_and(|p| p.chain == first.chain))
                .count() as u64;
            if first.fixed || n == 0 {
                return None;
            }
            if n < len {
                span(gpa + n, len - n).for_each(|i| new[i] = None);
            } else if n > len {
                let g = n - len;
                if gpa + n > PAGES || !all(span(gpa + len, g), &|p| p.is_none()) {
                    return None;
                }
                let last = pages[start + len as usize - 1]?;
                let room = last.off + 1 + g <= MAP_PAGES
                    && (last.off + 1..last.off + 1 + g).all(|o| !host_used(pages, last.m, o));
                let (m, off0) = if room {
                    (last.m, last.off + 1)
                } else {
                    let m = grow?;
                    if g > MAP_PAGES || (0..g).any(|o| host_used(pages, m, o)) {
                        return None;
                    }
                    (m, 0)
                };
                for (i, o) in span(gpa + len, g).zip(off0..) {
                    new[i] = Some(Page { m, off: o, ..last });
                }
            }
        }
    }
    merge_chains(&mut new);
    (slot_count(&new) <= MAX_SLOTS as usize).then_some(new)
}

fn real_apply(
    map: &SlotMap,
    maps: &[Arc<HostMapping>],
    op: &Op,
) -> Result<Transition, SlotMapError> {
    match *op {
        Op::Plug {
            gpa,
            n,
            m,
            off,
            ro,
            dl,
        } => {
            let flags = SlotFlags {
                read_only: ro,
                dirty_log: dl,
                fixed: false,
            };
            map.plug(Gpa(gpa * P), n * P, maps[m].clone(), off * P, flags)
        }
        Op::Unplug { gpa, n } => map.unplug(Gpa(gpa * P), n * P),
        Op::Protect { gpa, n, ro } => map.protect(Gpa(gpa * P), n * P, ro),
        Op::DirtyLog { gpa, n, on } => map.set_dirty_log(Gpa(gpa * P), n * P, on),
        Op::Move { gpa, n, dst } => map.move_range(Gpa(gpa * P), n * P, Gpa(dst * P)),
        Op::Resize { gpa, n, grow } => {
            map.resize(Gpa(gpa * P), n * P, grow.map(|m| maps[m].clone()))
        }
    }
}

/// The map's view of one page, in model terms.
fn real_page(map: &SlotMap, maps: &[Arc<HostMapping>], page: u64) -> Option<Page> {
    let (hva, slot) = map.translate(Gpa(page * P))?;
    let m = maps
        .iter()
        .position(|m| Arc::ptr_eq(m, slot.mapping()))
        .expect("unknown mapping");
    let f = slot.flags();
    Some(Page {
        m,
        off: (hva.0 - maps[m].hva().0) / P,
        ro: f.read_only,
        dl: f.dirty_log,
        fixed: f.fixed,
        chain: 0,
    })
}

fn pages_of(ranges: impl Iterator<Item = GpaRange>) -> BTreeSet<u64> {
    ranges
        .flat_map(|r| r.start().0 / P..r.end().0 / P)
        .collect()
}

fn check_reports(before: &Model, after: &Model, t: &Transition, maps: &[Arc<HostMapping>]) {
    let host = |pages: &Model| -> BTreeSet<(usize, u64)> {
        pages.iter().flatten().map(|p| (p.m, p.off)).collect()
    };
    let released: BTreeSet<_> = host(before).difference(&host(after)).copied().collect();
    let discarded: BTreeSet<_> = t
        .discards
        .iter()
        .flat_map(|d| {
            let m = maps
                .iter()
                .position(|m| Arc::ptr_eq(m, &d.mapping))
                .expect("unknown mapping");
            (d.offset / P..(d.offset + d.len) / P).map(move |o| (m, o))
        })
        .collect();
    assert_eq!(discarded, released, "discards");
    let mem = |p: &Option<Page>| p.map(|p| (p.m, p.off));
    let gone: BTreeSet<u64> = (0..PAGES)
        .filter(|&i| {
            before[i as usize].is_some() && mem(&before[i as usize]) != mem(&after[i as usize])
        })
        .collect();
    let unmapped = pages_of(
        t.removed
            .iter()
            .filter(|(_, k)| *k == ChangeKind::Unmapped)
            .map(|(r, _)| *r),
    );
    assert_eq!(unmapped, gone, "removed Unmapped");
    let new: BTreeSet<u64> = (0..PAGES)
        .filter(|&i| before[i as usize].is_none() && after[i as usize].is_some())
        .collect();
    assert_eq!(pages_of(t.added.iter().copied()), new, "added");
}

fn run(ops: &[Op]) {
    let mut maps: Vec<_> = (0..NMAPS).map(|_| anon(MAP_PAGES)).collect();
    maps.push(anon(2));
    let fixed = SlotFlags {
        fixed: true,
        ..SlotFlags::NONE
    };
    let mut map = SlotMap::new(config(MAX_SLOTS, PAGES * P))
        .plug(Gpa(BOOT_AT * P), 2 * P, maps[BOOT].clone(), 0, fixed)
        .unwrap()
        .map;
    let mut model: Model = vec![None; PAGES as usize];
    for (i, o) in (BOOT_AT..BOOT_AT + 2).enumerate() {
        model[o as usize] = Some(Page {
            m: BOOT,
            off: i as u64,
            ro: false,
            dl: false,
            fixed: true,
            chain: u64::MAX,
        });
    }
    for (step, op) in ops.iter().enumerate() {
        let op = &resolve(&model, op);
        let before = snapshot(&map);
        let want = model_apply(&model, op, step as u64);
        match (real_apply(&map, &maps, op), want) {
            (Ok(t), Some(new)) => {
                check_transition(&map, &t);
                check_reports(&model, &new, &t, &maps);
                map = t.map;
                model = new;
            }
            (Err(e), None) => assert_eq!(
                snapshot(&map),
                before,
                "step {step} {op:?}: {e} changed the map"
            ),
            (Ok(t), None) => panic!(
                "step {step} {op:?}: model refuses, map accepts: {:?}",
                t.changes
            ),
            (Err(e), Some(_)) => panic!("step {step} {op:?}: model accepts, map refuses: {e}"),
        }
        for page in 0..PAGES + 2 {
            let want = model
                .get(page as usize)
                .copied()
                .flatten()
                .map(|p| Page { chain: 0, ..p });
            assert_eq!(
                real_page(&map, &maps, page),
                want,
                "step {step} {op:?}: page {page}"
            );
        }
        assert_eq!(
            map.len(),
            slot_count(&model),
            "step {step} {op:?}: slot count"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn test_model_random_op_sequences_agree_with_reference(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
