use arbitrary::{Arbitrary, Unstructured};
use proptest::prelude::*;

use super::encode::encode;
use super::{decode, run, v1, Addr, Dma, Input, Op, Place, Size};
use crate::scenario::step::Action;
use crate::scenario::Scenario;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/memslots")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The encoder inverts `arbitrary`'s decoding: any input (decoded from
    /// random bytes, so every kind of step) comes back from its bytes.
    #[test]
    fn test_an_encoded_input_decodes_to_itself(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let input = Input::arbitrary_take_rest(Unstructured::new(&data)).unwrap();
        let bytes = encode(&input);
        let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        prop_assert_eq!(back, input);
    }

    /// An input of the old format, converted, decodes with the new decoder
    /// to the old decoder's actions and failure points.
    #[test]
    fn test_a_converted_v1_input_decodes_as_before(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        prop_assert_eq!(decode(&v1::convert(&data)), v1::decode(&data));
    }
}

/// Converts the corpus in `VMM_CONVERT_CORPUS` (a directory of inputs in
/// the old format) in place, checking that each decodes with the new
/// decoder exactly as with the old: run once when the format changed.
#[test]
#[ignore = "a one-off conversion of a corpus directory (VMM_CONVERT_CORPUS)"]
fn convert_the_corpus_from_v1() {
    let dir = std::env::var_os("VMM_CONVERT_CORPUS").expect("VMM_CONVERT_CORPUS=DIR");
    let mut converted = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let old = std::fs::read(&path).unwrap();
        let new = v1::convert(&old);
        assert_eq!(decode(&new), v1::decode(&old), "{}", path.display());
        std::fs::write(&path, new).unwrap();
        converted += 1;
    }
    eprintln!("{converted} inputs converted, each decodes to the same actions and failure points");
}

fn input(ops: Vec<Op>) -> Vec<u8> {
    encode(&Input {
        ops,
        faults: Vec::new(),
    })
}

/// A plug and a plug-many whose second slot lands on it: refused whole,
/// leaving nothing of the batch (the planted `plug-many-partial` bug
/// leaves its first slot, which the slots invariant finds).
#[test]
fn test_a_plug_many_over_a_slot_is_refused_whole() {
    let data = input(vec![
        Op::Plug {
            at: Addr::Page(8),
            size: Size::Pages(2),
            backing: 0,
            flags: 0,
        },
        Op::PlugMany {
            at: Addr::Page(8),
            below: 1,
            count: 3,
        },
        Op::PlugMany {
            at: Addr::Page(64),
            below: 0,
            count: 228,
        },
        Op::PlugMany {
            at: Addr::Page(200),
            below: 0,
            count: 255,
        },
    ]);
    let (actions, _) = decode(&data);
    assert_eq!(actions.len(), 4);
    let Action::PlugMany(p) = &actions[1] else {
        panic!("{:?}", actions[1])
    };
    assert_eq!((p.gpa.0, p.count.map(|c| c.0)), (0x1_0000_6000, Some(3)));
    assert_eq!(run(&data), Ok(4));
}

/// Guest writes and DMA transfers over a logging slot, then a dirty read:
/// the model's exact dirty set (vCPU and device writes) must match.
#[test]
fn test_guest_writes_and_dma_reach_the_dirty_set() {
    let data = input(vec![
        Op::Plug {
            at: Addr::Huge(1),
            size: Size::Huge(1),
            backing: 0,
            flags: 2,
        },
        Op::Fill {
            at: Place::Huge(1),
            pages: 2,
            seed: 7,
        },
        Op::Write {
            at: Place::Huge(1),
            word: 600,
        },
        Op::Touch {
            at: Place::HugeEnd(1),
            pages: 1,
            stride: 3,
        },
        Op::Dma(Dma::Fill {
            at: Place::Page(600),
            pages: 3,
            value: 9,
        }),
        Op::Dma(Dma::Copy {
            at: Place::Page(600),
            pages: 1,
            to: Place::Page(700),
        }),
        Op::Dma(Dma::Checksum {
            at: Place::Page(700),
            pages: 0,
        }),
        Op::DirtyPages {
            at: Addr::Huge(1),
            size: Size::Huge(1),
        },
    ]);
    let (actions, _) = decode(&data);
    let kinds: Vec<&str> = actions.iter().map(|a| a.kind()).collect();
    assert_eq!(
        kinds,
        [
            "plug",
            "fill",
            "write",
            "touch",
            "dma-fill",
            "dma-copy",
            "dma-checksum",
            "dirty-pages"
        ]
    );
    assert_eq!(run(&data), Ok(8));
    // The touch of the last page runs into the next huge page, unplugged.
    let sc = super::scenario(&data, &super::layout(), "guest and DMA");
    let back = Scenario::parse(&sc.to_toml()).unwrap();
    assert_eq!(back.steps.len(), 8);
    let touch = &back.steps[3];
    assert_eq!(
        super::super::timeline::allowed(touch),
        [crate::scenario::Outcome::Unplugged]
    );
}

/// The committed corpus has steps of every kind the decoder makes (the
/// inputs converted from the old format have none of the new kinds; a
/// merge of a run of the new format added them), so replaying it in CI
/// runs every kind.
#[test]
fn test_the_corpus_has_every_kind_of_step() {
    let mut kinds = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let (actions, _) = decode(&std::fs::read(entry.unwrap().path()).unwrap());
        kinds.extend(actions.iter().map(|a| a.kind()));
    }
    for kind in [
        "plug",
        "unplug",
        "protect",
        "move",
        "resize",
        "dirty-log",
        "dirty-pages",
        "pin",
        "unpin",
        "check",
        "plug-many",
        "fill",
        "write",
        "touch",
        "dma-fill",
        "dma-copy",
        "dma-checksum",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} step in the corpus: {kinds:?}"
        );
    }
}

/// What the committed inputs cost, uninstrumented: every input run five
/// times after a warm-up, its best time kept; prints the mean, median and
/// tail, the share of the time in inputs with each kind of step, and the
/// slowest inputs. A file plug's unnamed file goes to `TMPDIR` (put it on
/// tmpfs, as the libFuzzer target does). Figures: docs/fuzzing.md.
///
/// `TMPDIR=/dev/shm cargo test --release -p vmm --lib corpus_cost -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn corpus_cost() {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};
    let mut rows: Vec<(Duration, usize, Vec<&str>, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        // Every committed input runs clean (the replay test says so too).
        run(&data).unwrap_or_else(|f| panic!("{}: {f}", path.display()));
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = run(&data);
                t.elapsed()
            })
            .min()
            .unwrap();
        let (actions, _) = decode(&data);
        let mut kinds: Vec<&str> = actions.iter().map(Action::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        rows.push((best, actions.len(), kinds, path));
    }
    assert!(!rows.is_empty(), "no corpus at {}", corpus().display());
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    let total: Duration = rows.iter().map(|r| r.0).sum();
    let n = rows.len();
    let at = |q: f64| rows[((1.0 - q) * n as f64) as usize].0;
    eprintln!(
        "{n} inputs: mean {:?}, median {:?}, 90th percentile {:?}, 99th {:?}",
        total / n as u32,
        at(0.5),
        at(0.9),
        at(0.99)
    );
    let share = |t: Duration| 100.0 * t.as_secs_f64() / total.as_secs_f64();
    let tenth: Duration = rows.iter().take(n / 10).map(|r| r.0).sum();
    eprintln!("the slowest tenth: {:.1}% of the time", share(tenth));
    let mut by_kind: BTreeMap<&str, (Duration, u32)> = BTreeMap::new();
    for (t, _, kinds, _) in &rows {
        for k in kinds {
            let e = by_kind.entry(k).or_default();
            e.0 += *t;
            e.1 += 1;
        }
    }
    eprintln!("inputs with a step of each kind: how many, their share of the time, their mean");
    for (kind, (t, count)) in by_kind {
        eprintln!("  {kind:14} {count:5} {:5.1}% {:?}", share(t), t / count);
    }
    eprintln!("the slowest inputs:");
    for (t, steps, kinds, path) in rows.iter().take(5) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        eprintln!("  {t:?} {steps} steps ({}) {name}", kinds.join(","));
    }
}
