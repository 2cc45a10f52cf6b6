//! Property tests: random sequences of map/unmap/protect/split/collapse
//! against a simple model (extents of pages -> host address and permissions),
//! comparing `lookup` at sampled addresses and `dump` after every operation.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::mm::addr::{Gpa, GpaRange, Hva, HUGE_1G, HUGE_2M, PAGE_SIZE};

/// The guest-physical window the operations touch: two 1 GiB regions.
const WINDOW: u64 = 2 * HUGE_1G;
const WINDOW_PAGES: u64 = WINDOW / PAGE_SIZE;
/// hva = gpa + shift. The last shift is only 4 KiB aligned, so huge maps
/// with it fail and the model must predict `MisalignedHva`.
const SHIFTS: [u64; 3] = [0x100_0000_0000, 0x100_4000_0000, 0x200_0000_1000];

/// The model: first page -> (page count, first host page address, perms).
#[derive(Default, Debug)]
struct Model {
    extents: BTreeMap<u64, (u64, u64, Perms)>,
}

impl Model {
    /// Splits the extent containing page `p` (if any) so one starts at `p`.
    fn cut(&mut self, p: u64) {
        let Some((&s, &(n, h, perms))) = self.extents.range(..p).next_back() else {
            return;
        };
        if s + n > p {
            self.extents.insert(s, (p - s, h, perms));
            self.extents
                .insert(p, (s + n - p, h + (p - s) * PAGE_SIZE, perms));
        }
    }
    fn is_free(&self, start: u64, end: u64) -> bool {
        let before = self.extents.range(..start).next_back();
        before.is_none_or(|(&s, &(n, _, _))| s + n <= start)
            && self.extents.range(start..end).next().is_none()
    }
    fn remove(&mut self, start: u64, end: u64) {
        self.cut(start);
        self.cut(end);
        let keys: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.extents.remove(&k);
        }
    }
    fn protect(&mut self, start: u64, end: u64, perms: Perms) {
        self.cut(start);
        self.cut(end);
        for (_, v) in self.extents.range_mut(start..end) {
            v.2 = perms;
        }
    }
    fn get(&self, page: u64) -> Option<(u64, Perms)> {
        let (&s, &(n, h, perms)) = self.extents.range(..=page).next_back()?;
        (page < s + n).then_some((h + (page - s) * PAGE_SIZE, perms))
    }
    /// Maximal runs (gpa, len, hva, perms), merged across extents.
    fn runs(&self) -> Vec<(u64, u64, u64, Perms)> {
        merge(
            self.extents
                .iter()
                .map(|(&s, &(n, h, p))| (s * PAGE_SIZE, n * PAGE_SIZE, h, p)),
        )
    }
}

/// Merges adjacent runs that continue each other in both address spaces.
fn merge(runs: impl Iterator<Item = (u64, u64, u64, Perms)>) -> Vec<(u64, u64, u64, Perms)> {
    let mut out: Vec<(u64, u64, u64, Perms)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && l.2 + l.1 == r.2 && l.3 == r.3 => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        size: PageSize,
        slot: u64,
        shift: usize,
        perms: Perms,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
    Protect {
        page: u64,
        pages: u64,
        perms: Perms,
    },
    Split {
        page: u64,
    },
    Collapse {
        size: PageSize,
        slot: u64,
    },
}

fn perms() -> impl Strategy<Value = Perms> {
    prop_oneof![
        Just(Perms::R),
        Just(Perms::RW),
        Just(Perms::RX),
        Just(Perms::RWX)
    ]
}

fn size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        4 => Just(PageSize::Size4K),
        3 => Just(PageSize::Size2M),
        1 => Just(PageSize::Size1G),
    ]
}

/// A length in pages: a few pages, or a few 2 MiB regions (may cross them).
fn pages() -> impl Strategy<Value = u64> {
    prop_oneof![
        1..64u64,
        (1..1200u64),
        (1..3u64).prop_map(|n| n * 512),
        Just(WINDOW_PAGES)
    ]
}

/// An index, mostly among the first 8 regions of 2 MiB (where the fills
/// are, so collapses and conflicts happen), sometimes anywhere.
fn slot() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0..8u64, 1 => any::<u64>()]
}

/// A page, mostly in the first 16 MiB.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0..(8 * HUGE_2M / PAGE_SIZE), 1 => 0..WINDOW_PAGES]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size(), slot(), 0..SHIFTS.len(), perms())
            .prop_map(|(size, slot, shift, perms)| Op::Map { size, slot, shift, perms }),
        2 => (page(), pages()).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        2 => (page(), pages(), perms())
            .prop_map(|(page, pages, perms)| Op::Protect { page, pages, perms }),
        2 => page().prop_map(|page| Op::Split { page }),
        3 => (prop_oneof![Just(PageSize::Size2M), Just(PageSize::Size1G)], slot())
            .prop_map(|(size, slot)| Op::Collapse { size, slot }),
    ]
}

/// A run of 512 4K maps that a later collapse can fold: makes collapses
/// succeed often enough to matter.
fn fill_2m(t: &Stage2Table, m: &mut Model, region: u64, shift: u64, perms: Perms) {
    let start = region * HUGE_2M;
    for i in 0..512 {
        let gpa = start + i * PAGE_SIZE;
        let ok = t
            .map(Gpa(gpa), Hva(gpa + shift), PageSize::Size4K, perms)
            .is_ok();
        assert_eq!(ok, m.is_free(gpa / PAGE_SIZE, gpa / PAGE_SIZE + 1));
        if ok {
            m.extents.insert(gpa / PAGE_SIZE, (1, gpa + shift, perms));
        }
    }
}

/// Applies `op` to both and checks the table's answer against the model's.
/// Returns addresses worth sampling afterwards.
fn apply(t: &Stage2Table, m: &mut Model, op: &Op) -> Vec<u64> {
    match *op {
        Op::Map {
            size,
            slot,
            shift,
            perms,
        } => {
            let gpa = (slot % (WINDOW / size.bytes())) * size.bytes();
            let hva = gpa + SHIFTS[shift];
            let (first, end) = (gpa / PAGE_SIZE, (gpa + size.bytes()) / PAGE_SIZE);
            let got = t.map(Gpa(gpa), Hva(hva), size, perms);
            let want = if hva % size.bytes() != 0 {
                Err(Stage2Error::MisalignedHva {
                    hva: Hva(hva),
                    size,
                })
            } else if !m.is_free(first, end) {
                Err(Stage2Error::AlreadyMapped {
                    gpa: Gpa(gpa),
                    size,
                })
            } else {
                m.extents.insert(first, (end - first, hva, perms));
                Ok(())
            };
            assert_eq!(got, want, "{op:?}");
            vec![gpa, gpa + size.bytes() - 1, gpa + size.bytes()]
        }
        Op::Unmap { page, pages } => {
            let end = (page + pages).min(WINDOW_PAGES);
            let r = GpaRange::from_bounds(Gpa(page * PAGE_SIZE), Gpa(end * PAGE_SIZE)).unwrap();
            let before: u64 = m.runs().iter().map(|r| r.1).sum();
            let unmapped = t.unmap(r).unwrap();
            m.remove(page, end);
            let after: u64 = m.runs().iter().map(|r| r.1).sum();
            assert_eq!(unmapped * PAGE_SIZE, before - after, "{op:?}");
            vec![
                r.start().0.saturating_sub(1),
                r.start().0,
                r.end().0 - 1,
                r.end().0,
            ]
        }
        Op::Protect { page, pages, perms } => {
            let end = (page + pages).min(WINDOW_PAGES);
            let r = GpaRange::from_bounds(Gpa(page * PAGE_SIZE), Gpa(end * PAGE_SIZE)).unwrap();
            t.protect(r, perms).unwrap();
            m.protect(page, end, perms);
            vec![
                r.start().0.saturating_sub(1),
                r.start().0,
                r.end().0 - 1,
                r.end().0,
            ]
        }
        Op::Split { page } => {
            let gpa = page * PAGE_SIZE;
            let before = t.lookup(Gpa(gpa));
            match t.split(Gpa(gpa)) {
                Ok(new) => {
                    let before = before.unwrap();
                    assert!(new < before.page_size);
                    assert_eq!(t.lookup(Gpa(gpa)).unwrap().page_size, new);
                }
                Err(Stage2Error::NotHuge { .. }) => {
                    assert_eq!(before.unwrap().page_size, PageSize::Size4K);
                }
                Err(Stage2Error::NotMapped { .. }) => assert!(before.is_none()),
                Err(e) => panic!("{op:?}: {e}"),
            }
            vec![gpa]
        }
        Op::Collapse { size, slot } => {
            let gpa = (slot % (WINDOW / size.bytes())) * size.bytes();
            match t.collapse(Gpa(gpa), size) {
                Ok(()) => assert_eq!(t.lookup(Gpa(gpa)).unwrap().page_size, size),
                Err(Stage2Error::NotCollapsible { .. } | Stage2Error::NotMapped { .. }) => {}
                Err(e) => panic!("{op:?}: {e}"),
            }
            vec![gpa, gpa + size.bytes() - 1]
        }
    }
}

/// Compares `dump` (merged across page sizes) with the model, and checks the
/// dump's own invariants.
fn check_dump(t: &Stage2Table, m: &Model) {
    let runs = t.dump();
    for w in runs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.range.end() <= b.range.start(),
            "unsorted or overlapping: {a:?} {b:?}"
        );
        let continues = a.range.end() == b.range.start()
            && a.hva.0 + a.range.len() == b.hva.0
            && a.perms == b.perms
            && a.page_size == b.page_size;
        assert!(!continues, "unmerged runs: {a:?} {b:?}");
    }
    for r in &runs {
        let ps = r.page_size.bytes();
        assert!(
            r.range.start().is_aligned(ps) && r.range.len() % ps == 0 && r.hva.is_aligned(ps),
            "{r:?}"
        );
    }
    let got = merge(
        runs.iter()
            .map(|r| (r.range.start().0, r.range.len(), r.hva.0, r.perms)),
    );
    assert_eq!(got, m.runs());
}

fn check_lookup(t: &Stage2Table, m: &Model, gpa: u64) {
    let got = t.lookup(Gpa(gpa)).map(|tr| (tr.hva.0, tr.perms));
    let want = m
        .get(gpa / PAGE_SIZE)
        .map(|(h, p)| (h + gpa % PAGE_SIZE, p));
    assert_eq!(got, want, "lookup({gpa:#x})");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn test_table_random_ops_match_model(
        fills in proptest::collection::vec((0..8u64, 0..2usize, perms()), 0..4),
        ops in proptest::collection::vec(op(), 1..40),
        samples in proptest::collection::vec(0..WINDOW + HUGE_2M, 12),
    ) {
        let t = Stage2Table::new();
        let mut m = Model::default();
        for (region, shift, perms) in fills {
            fill_2m(&t, &mut m, region, SHIFTS[shift], perms);
        }
        check_dump(&t, &m);
        for op in &ops {
            let focus = apply(&t, &mut m, op);
            check_dump(&t, &m);
            for gpa in focus.into_iter().chain(samples.iter().copied()) {
                check_lookup(&t, &m, gpa);
            }
        }
        // Unmapping everything leaves only the root linked.
        t.unmap(GpaRange::new(Gpa(0), WINDOW).unwrap()).unwrap();
        prop_assert!(t.dump().is_empty());
        prop_assert_eq!(t.reclaim_stats().linked, 1);
    }
}
