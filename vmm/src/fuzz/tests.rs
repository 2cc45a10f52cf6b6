//! The generator's determinism and bias, and the sim tier against the model.

use super::gen::{GenConfig, Weights};
use super::model::slots::{Limits, PAGE};
use super::model::Layout;
use super::timeline::{expectations, generate};
use crate::scenario::pages::DirtyWant;
use crate::scenario::step::{self, Action};
use crate::scenario::Scenario;

fn layout() -> Layout {
    Layout {
        boot_end: 0x60_0000,
        ram: (0x4000_0000, 64 << 20),
        limits: Limits {
            max_gpa: 1 << 48,
            max_slots: 64,
            reserved: (0x3000_0000, 0x3000_1000),
            read_only: true,
        },
        pin_limit: 4096,
        vcpus: 2,
        guest_end: 64 << 30,
        dirty_log: crate::mm::manager::DirtyLogMode::Bitmap,
    }
}

fn cfg(guest: bool) -> GenConfig {
    GenConfig {
        arena_base: 0x1_0000_0000,
        arena_size: 64 << 20,
        guest,
        weights: Weights::default(),
        prefill: 0,
    }
}

#[test]
fn test_same_seed_same_timeline() {
    let a = generate(42, &cfg(true), &layout(), 300);
    let b = generate(42, &cfg(true), &layout(), 300);
    let c = generate(43, &cfg(true), &layout(), 300);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn test_biased_values_appear() {
    let l = layout();
    let actions = generate(7, &cfg(true), &l, 3000);
    let ranges: Vec<(u64, u64)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Plug(p) => Some((p.gpa.0, p.size.0)),
            Action::Unplug(u) => Some((u.gpa.0, u.size.0)),
            Action::Protect(p) => Some((p.gpa.0, p.size.0)),
            Action::Move(m) => Some((m.gpa.0, m.size.0)),
            _ => None,
        })
        .collect();
    let any = |f: &dyn Fn(&(u64, u64)) -> bool| ranges.iter().any(f);
    assert!(any(&|r| r.1 == 0), "zero sizes");
    assert!(any(&|r| r.0.checked_add(r.1).is_none()), "wrapping ranges");
    assert!(any(&|r| r.0 % PAGE != 0), "misaligned addresses");
    assert!(any(&|r| r.0 == l.limits.reserved.0), "the register page");
    assert!(
        any(&|r| r.0 >= l.limits.max_gpa - (2 << 20)),
        "the top of the window"
    );
    assert!(
        any(&|r| r.0 % (2 << 20) == 0 && r.1 % (2 << 20) == 0),
        "2 MiB alignment"
    );
    assert!(actions.iter().any(|a| matches!(a, Action::PlugMany(_))));
    assert!(
        actions.iter().any(|a| a.guest().is_some_and(|g| g.2)),
        "async commands"
    );
    // Every kind of the spec shows up.
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
        "fill",
        "verify",
        "touch",
        "read",
        "write",
        "dma-copy",
        "dma-fill",
        "dma-checksum",
        "wait",
    ] {
        assert!(actions.iter().any(|a| a.kind() == kind), "{kind}");
    }
}

#[test]
fn test_generated_timelines_are_valid_scenarios() {
    for seed in 0..5 {
        let actions = generate(seed, &cfg(true), &layout(), 300);
        let steps = expectations(&layout(), &actions);
        let sc = super::real::scenario("t", "d", &layout(), steps);
        let back = Scenario::parse(&sc.to_toml()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(back.steps.len(), sc.steps.len());
    }
}

#[test]
fn test_sim_tier_agrees_with_the_model() {
    for seed in 0..6 {
        let actions = generate(seed, &cfg(false), &layout(), 400);
        let finding = super::sim::run(&layout(), &actions).unwrap();
        assert_eq!(finding, None, "seed {seed}");
    }
}

#[test]
fn test_sim_tier_with_failed_ioctls_rolls_back_like_the_model() {
    use crate::mm::manager::DirtyLogMode;
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::Manual,
        DirtyLogMode::Ring,
    ] {
        let layout = Layout {
            dirty_log: mode,
            ..layout()
        };
        for seed in 0..4 {
            // plug-many included: it is one transition, failures roll it back.
            let actions = generate(seed, &cfg(false), &layout, 300);
            let faults: Vec<(usize, usize)> =
                (0..actions.len()).step_by(3).map(|i| (i, i % 4)).collect();
            let finding = super::sim::run_with_faults(&layout, &actions, &faults).unwrap();
            assert_eq!(finding, None, "{mode}, seed {seed}");
        }
    }
}

/// A memslot change failing anywhere in a `plug-many` rolls the whole
/// batch back on the simulated tier: nothing of it is left (every sim
/// invariant holds against the model from before), and it then goes
/// through.
#[test]
fn test_sim_tier_plug_many_with_a_failed_ioctl_rolls_back() {
    let layout = layout();
    let many = Action::PlugMany(step::PlugMany {
        gpa: crate::scenario::num::Num(0x1_0000_0000),
        count: Some(crate::scenario::num::Num(4)),
    });
    for offset in 0..4 {
        let mut vm = super::sim::SimVm::new(&layout).unwrap();
        let mut model = super::model::Model::new(layout.clone());
        vm.inject_failure(offset, libc::EIO);
        let (outcome, detail) = vm.step(&many);
        assert_eq!(
            outcome,
            crate::scenario::Outcome::KvmRolledBack,
            "{offset}: {detail}"
        );
        vm.check(&model, true).unwrap();
        assert_eq!(model.predict(&many), vec![crate::scenario::Outcome::Ok]);
        let (outcome, detail) = vm.step(&many);
        assert_eq!(outcome, crate::scenario::Outcome::Ok, "{offset}: {detail}");
        vm.check(&model, true).unwrap();
    }
}

#[test]
fn test_sim_tier_predicts_nonempty_dirty_page_sets() {
    let actions = generate(3, &cfg(false), &layout(), 3000);
    let counted = actions
        .iter()
        .filter(|a| {
            matches!(a, Action::DirtyPages(step::DirtyPages {
                pages: Some(DirtyWant::Set(s)), ..
            }) if !s.is_empty())
        })
        .count();
    assert!(counted >= 5, "{counted} dirty-pages steps expect pages");
    assert_eq!(super::sim::run(&layout(), &actions).unwrap(), None);
}

#[test]
fn test_sim_tier_dirty_counts_are_exact_in_every_dirty_log_mode() {
    use crate::mm::manager::DirtyLogMode;
    for mode in DirtyLogMode::ALL {
        let l = Layout {
            dirty_log: mode,
            ..layout()
        };
        for seed in [3, 11] {
            let actions = generate(seed, &cfg(false), &l, 1000);
            assert_eq!(
                super::sim::run(&l, &actions).unwrap(),
                None,
                "{mode} seed {seed}"
            );
        }
    }
    // The oracle knows the modes apart: on a bitmap-mode timeline, the
    // manual-mode model expects `dirty-count` where initially-set pages
    // make KVM's count differ, and the manual VM agrees with it exactly.
    let bitmap = generate(3, &cfg(false), &layout(), 2000);
    let manual = Layout {
        dirty_log: DirtyLogMode::Manual,
        ..layout()
    };
    let differ = super::timeline::expectations(&manual, &bitmap)
        .iter()
        .filter(|s| {
            matches!(&s.expect, crate::scenario::Expect::AnyOf(o) if o == &[crate::scenario::Outcome::DirtyCount])
        })
        .count();
    assert!(differ >= 3, "only {differ} dirty-count differences");
    assert_eq!(super::sim::run(&manual, &bitmap).unwrap(), None);
}

/// A write to a logging slot, then an unplug that deletes the slot (split
/// around the hole): the manager must harvest the slot's log before the
/// delete, and the sim tier's per-step invariants must not read the log
/// themselves, or a lost harvest could never show.
#[test]
fn test_sim_dirty_pages_of_a_deleted_logging_slot_are_reported() {
    let sc = Scenario::parse(
        r#"
name = "t"
[[step]]
do = "plug"
gpa = "0x100000000"
size = "0x4000"
flags = ["dirty-log"]
[[step]]
do = "write"
gpa = "0x100001000"
value = "1"
[[step]]
do = "unplug"
gpa = "0x100002000"
size = "0x1000"
[[step]]
do = "dirty-pages"
gpa = "0x100000000"
size = "0x4000"
pages = 1
"#,
    )
    .unwrap();
    let actions: Vec<Action> = sc.steps.iter().map(|s| s.action.clone()).collect();
    assert_eq!(super::sim::run(&layout(), &actions).unwrap(), None);
}

/// `--fail-every`: the failing steps are chosen by their text, so they
/// stay chosen when other steps are dropped.
#[test]
fn test_fault_points_follow_the_step_not_its_position() {
    let actions = generate(5, &cfg(false), &layout(), 400);
    let all = super::campaign::fault_points(&actions, 5);
    assert!(all.len() > 20 && all.len() < 160, "{}", all.len());
    assert!(all.iter().all(|&(_, o)| o < 4));
    let tail = super::campaign::fault_points(&actions[100..], 5);
    let shifted: Vec<(usize, usize)> = all
        .iter()
        .filter(|f| f.0 >= 100)
        .map(|&(i, o)| (i - 100, o))
        .collect();
    assert_eq!(tail, shifted);
    assert!(super::campaign::fault_points(&actions, 0).is_empty());
}

/// The committed libFuzzer corpus replays clean through the target's own
/// code (`bytes::run`), without nightly or cargo-fuzz.
#[test]
fn test_the_libfuzzer_corpus_replays_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/memslots");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(finding) = super::bytes::run(&data) {
            panic!("{}: {finding}", path.display());
        }
        inputs += 1;
    }
    assert!(inputs >= 10, "{inputs} inputs in {}", dir.display());
}

/// Any input converts to a scenario file that the scenario reader takes
/// back, with the model's predictions as expectations.
#[test]
fn test_a_libfuzzer_input_converts_to_a_scenario_file() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/memslots");
    // The corpus input that decodes to the most steps.
    let (data, actions) = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .map(|d| {
            let (a, _) = super::bytes::decode(&d);
            (d, a)
        })
        .max_by_key(|(_, a)| a.len())
        .unwrap();
    assert!(actions.len() >= 5, "{}", actions.len());
    let sc = super::bytes::scenario(&data, &super::bytes::layout(), "converted");
    let back = Scenario::parse(&sc.to_toml()).unwrap();
    assert_eq!(back.steps.len(), actions.len());
}

/// A reproducer of the sim tier with `--fail-every 7`, manual mode: a
/// page moved out of a logging THP slot; the move's memslot calls fail
/// partway (step 2 is a fault point) and are rolled back. The rollback
/// deletes the page's new logging slot, whose log (initially set) the
/// manager harvests: those pages belong to the host memory, which after
/// the rollback is the old slot's again, so the destination, unplugged,
/// must refuse `dirty-pages` (it reported the page, as if still there).
const ROLLED_BACK_MOVE: &str = r#"
name = "rolled-back-move"
mem = "0x4000000"
vcpus = 2
dirty_log = "manual"

[[step]]
do = "plug"
gpa = "0x101a32000"
size = "0x80000"
backing = "thp"
flags = ["dirty-log"]

[[step]]
do = "move"
gpa = "0x101a9b000"
size = "0x1000"
to = "0x101201000"

[[step]]
do = "dirty-pages"
gpa = "0x101201000"
size = "0x1000"
pages = 1
"#;

#[test]
fn test_a_rolled_back_move_out_of_a_logging_slot_replays_clean() {
    let sc = Scenario::parse(ROLLED_BACK_MOVE).unwrap();
    let mode = super::campaign::replay_dirty_log(None, sc.dirty_log.as_deref()).unwrap();
    assert_eq!(mode, crate::mm::manager::DirtyLogMode::Manual);
    let l = Layout {
        dirty_log: mode,
        ..layout()
    };
    let actions: Vec<Action> = sc.steps.iter().map(|s| s.action.clone()).collect();
    let faults = super::campaign::fault_points(&actions, 7);
    assert!(
        faults.iter().any(|f| f.0 == 1),
        "the move fails: {faults:?}"
    );
    assert_eq!(
        super::sim::run_with_faults(&l, &actions, &faults).unwrap(),
        None
    );
}

/// `vmm fuzz --replay` runs in the mode the file's header names, as `vmm
/// run --scenario` does; the flag counts only where the file has none, and
/// a flag naming another mode is refused.
#[test]
fn test_replay_takes_the_dirty_log_mode_from_the_file_header() {
    use super::campaign::{replay_dirty_log, FuzzError};
    use crate::mm::manager::DirtyLogMode::{Bitmap, Manual, Ring};
    assert_eq!(replay_dirty_log(None, Some("manual")).unwrap(), Manual);
    assert_eq!(
        replay_dirty_log(Some(Manual), Some("manual")).unwrap(),
        Manual
    );
    assert_eq!(replay_dirty_log(None, None).unwrap(), Bitmap);
    assert_eq!(replay_dirty_log(Some(Ring), None).unwrap(), Ring);
    match replay_dirty_log(Some(Bitmap), Some("manual")) {
        Err(FuzzError::Flags(e)) => {
            assert!(
                e.contains("--dirty-log bitmap") && e.contains("manual"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Manual mode, a move out of a logging slot rolled back after the slot's
/// delete: the rollback re-creates the slot, and KVM (initially set) marks
/// every page of it dirty. The model must allow those pages (over-reports,
/// never losses) for each fault point of the move.
#[test]
fn test_a_rolled_back_op_may_report_its_re_created_logging_slots_in_manual_mode() {
    let sc = Scenario::parse(
        r#"
name = "t"
[[step]]
do = "plug"
gpa = "0x100000000"
size = "0x10000"
flags = ["dirty-log"]
[[step]]
do = "dirty-pages"
gpa = "0x100000000"
size = "0x10000"
pages = 16
[[step]]
do = "move"
gpa = "0x100003000"
size = "0x1000"
to = "0x100800000"
[[step]]
do = "dirty-pages"
gpa = "0x100000000"
size = "0x10000"
pages = 0
[[step]]
do = "dirty-pages"
gpa = "0x100800000"
size = "0x1000"
"#,
    )
    .unwrap();
    let actions: Vec<Action> = sc.steps.iter().map(|s| s.action.clone()).collect();
    for mode in crate::mm::manager::DirtyLogMode::ALL {
        let l = Layout {
            dirty_log: mode,
            ..layout()
        };
        for offset in 0..4 {
            assert_eq!(
                super::sim::run_with_faults(&l, &actions, &[(2, offset)]).unwrap(),
                None,
                "{mode}, the move's call {offset} fails"
            );
        }
    }
}

/// The real tier's timelines race async guest writes (fill, write, touch
/// for writing) and reads against memory ops, and every `dirty-pages`
/// carries the model's set (some with pages it cannot be sure of).
#[test]
fn test_real_tier_timelines_have_async_writes_and_dirty_sets() {
    let actions = generate(5, &cfg(true), &layout(), 3000);
    let async_kind = |kind: &str| {
        actions
            .iter()
            .filter(|a| a.kind() == kind && matches!(a.guest(), Some((_, _, true))))
            .count()
    };
    for kind in ["fill", "write", "touch", "read"] {
        assert!(async_kind(kind) >= 3, "{kind}: {} async", async_kind(kind));
    }
    let sets: Vec<&step::DirtyPages> = actions
        .iter()
        .filter_map(|a| match a {
            Action::DirtyPages(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(sets
        .iter()
        .all(|d| matches!(d.pages, Some(DirtyWant::Set(_)))
            || d.gpa.0.checked_add(d.size.0).is_none()));
    assert!(sets.iter().any(|d| d.maybe_pages.is_some()));
    assert!(sets
        .iter()
        .any(|d| matches!(&d.pages, Some(DirtyWant::Set(s)) if !s.is_empty())));
}

/// The sim tier generates DMA transfers, whose device dirty bits its
/// `dirty-pages` sets include.
#[test]
fn test_sim_tier_runs_dma_and_reports_device_dirty_pages() {
    let actions = generate(6, &cfg(false), &layout(), 3000);
    let dma = actions
        .iter()
        .filter(|a| matches!(a, Action::DmaFill(_) | Action::DmaCopy(_)))
        .count();
    assert!(dma >= 20, "{dma} DMA writes");
    assert_eq!(super::sim::run(&layout(), &actions).unwrap(), None);
    // A DMA fill into memory no slot logs: its page is in the next report
    // of a range that logs.
    let a = 0x1_0000_0000u64;
    let text = format!(
        r#"
        [[step]]
        do = "plug"
        gpa = "{a:#x}"
        size = "0x4000"
        [[step]]
        do = "plug"
        gpa = "{:#x}"
        size = "0x1000"
        flags = ["dirty-log"]
        [[step]]
        do = "dma-fill"
        gpa = "{:#x}"
        size = "0x1000"
        value = 1
        [[step]]
        do = "dirty-pages"
        gpa = "{a:#x}"
        size = "0x5000"
        pages = ["{:#x}"]
        "#,
        a + 0x4000,
        a + 0x2000,
        a + 0x2000
    );
    let last = |text: &str| {
        let sc = Scenario::parse(text).unwrap();
        let mut vm = super::sim::SimVm::new(&layout()).unwrap();
        let outcomes: Vec<_> = sc.steps.iter().map(|s| vm.step(&s.action)).collect();
        outcomes.last().cloned().unwrap()
    };
    let (outcome, detail) = last(&text);
    assert_eq!(outcome, crate::scenario::Outcome::Ok, "{detail}");
    assert!(detail.contains("1 written by devices"), "{detail}");
    // The same with the wrong page (of the right number) is refused.
    let wrong = text.replace(
        &format!("pages = [\"{:#x}\"]", a + 0x2000),
        &format!("pages = [\"{:#x}\"]", a + 0x3000),
    );
    let (outcome, detail) = last(&wrong);
    assert_eq!(outcome, crate::scenario::Outcome::DirtyCount, "{detail}");
    assert!(detail.contains("not reported: 0x100003000"), "{detail}");
}

#[test]
fn test_a_real_tier_reproducer_carries_its_pin_limit() {
    // `vmm run --scenario` would otherwise use RLIMIT_MEMLOCK, and a pin
    // the fuzzer's limit allowed could be refused on replay.
    let sc = super::real::scenario("t", "d", &layout(), Vec::new());
    assert_eq!(sc.pin_limit.as_deref(), Some("4096p"));
    let text = sc.to_toml();
    assert!(text.contains("pin_limit = \"4096p\""), "{text}");
}

/// What the sim tier finds replaying `scenarios/regressions/NAME` on a
/// 1-vCPU VM.
fn sim_replay_of_regression(name: &str) -> Option<super::finding::Finding> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios/regressions")
        .join(name);
    let sc = Scenario::load(&path).unwrap();
    let actions: Vec<Action> = sc.steps.iter().map(|s| s.action.clone()).collect();
    let l = Layout {
        vcpus: 1,
        ..layout()
    };
    super::sim::run(&l, &actions).unwrap()
}

/// Found by the sim tier: dirty logging switched on over part of a THP slot
/// that the device reads had mapped with one 2 MiB IOMMU leaf; a device
/// write then dirtied the whole leaf, beyond the logging slot.
#[test]
fn test_a_logging_split_of_a_thp_slot_keeps_device_dirty_pages_exact() {
    assert_eq!(
        sim_replay_of_regression("logging-split-cuts-a-2m-iommu-leaf.toml"),
        None
    );
}

/// Found by the sim tier (seed 71): a dirty read whose allowed outcomes
/// were `ok|dirty-count` reported the other allowed set, and the sim tier
/// then reset its model to before the read, as for a refused memory op, so
/// the pages that read had cleared stayed certain dirty and the next read
/// was judged wrong.
#[test]
fn test_a_dirty_read_with_another_allowed_outcome_still_clears_the_model() {
    assert_eq!(
        sim_replay_of_regression("dirty-read-of-another-allowed-set-clears.toml"),
        None
    );
}
