//! Hand-written timelines with known outcomes.

use super::slots::{Limits, PAGE};
use super::*;
use crate::scenario::num::Num;
use crate::scenario::pages::{DirtyWant, PageSet};
use crate::scenario::step::{self, Guest};
use crate::scenario::Outcome as O;

const A: u64 = 0x1_0000_0000;

fn layout(max_slots: usize) -> Layout {
    Layout {
        boot_end: 0x60_0000,
        ram: (0x4000_0000, 64 << 20),
        limits: Limits {
            max_gpa: 1 << 48,
            max_slots,
            reserved: (0x3000_0000, 0x3000_1000),
            read_only: true,
        },
        pin_limit: 64,
        vcpus: 2,
        guest_end: 64 << 30,
        dirty_log: crate::mm::manager::DirtyLogMode::Bitmap,
    }
}

fn plug(gpa: u64, size: u64) -> Action {
    Action::Plug(step::Plug {
        gpa: Num(gpa),
        size: Num(size),
        backing: None,
        flags: None,
    })
}
fn thp(gpa: u64, size: u64) -> Action {
    Action::Plug(step::Plug {
        gpa: Num(gpa),
        size: Num(size),
        backing: Some("thp".into()),
        flags: None,
    })
}
fn unplug(gpa: u64, size: u64) -> Action {
    Action::Unplug(step::Unplug {
        gpa: Num(gpa),
        size: Num(size),
    })
}
fn protect(gpa: u64, size: u64, access: Access) -> Action {
    Action::Protect(step::Protect {
        gpa: Num(gpa),
        size: Num(size),
        access,
    })
}
fn mv(gpa: u64, size: u64, to: u64) -> Action {
    Action::Move(step::Move {
        gpa: Num(gpa),
        size: Num(size),
        to: Num(to),
    })
}
fn resize(gpa: u64, new_size: u64) -> Action {
    Action::Resize(step::Resize {
        gpa: Num(gpa),
        new_size: Num(new_size),
    })
}
fn g<C>(command: C) -> Guest<C> {
    Guest {
        vcpu: 0,
        repeat: 1,
        is_async: false,
        command,
    }
}
fn fill(gpa: u64, size: u64, seed: u64) -> Action {
    Action::Fill(g(step::Fill {
        gpa: Num(gpa),
        size: Num(size),
        seed: Num(seed),
        origin: None,
    }))
}
fn verify(gpa: u64, size: u64, seed: u64, origin: Option<u64>) -> Action {
    Action::Verify(g(step::Verify {
        gpa: Num(gpa),
        size: Num(size),
        seed: Num(seed),
        origin: origin.map(Num),
    }))
}
fn zeros(gpa: u64, size: u64) -> Action {
    Action::VerifyConst(g(step::VerifyConst {
        gpa: Num(gpa),
        size: Num(size),
        value: Num(0),
    }))
}
fn pin(name: &str, gpa: u64, size: u64, revocable: bool) -> Action {
    Action::Pin(step::Pin {
        name: name.into(),
        gpa: Num(gpa),
        size: Num(size),
        revocable: Some(revocable),
        write: None,
    })
}

fn run(model: &mut Model, steps: &[(Action, &[O])]) {
    for (i, (a, want)) in steps.iter().enumerate() {
        assert_eq!(model.predict(a), *want, "step {} ({})", i + 1, a.kind());
    }
}

#[test]
fn test_slot_ops_split_merge_and_refuse_in_order() {
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (plug(A, 16 * PAGE), &[O::Ok]),
            (plug(A + PAGE, PAGE), &[O::Overlap]),
            (plug(A + 16 * PAGE, 0), &[O::ZeroSize]),
            (plug(A + 16 * PAGE + 8, PAGE), &[O::Misaligned]),
            (plug(0x3000_0000, PAGE), &[O::Reserved]),
            (plug(u64::MAX - PAGE + 1, 2 * PAGE), &[O::RangeOverflow]),
            (plug((1 << 48) - PAGE, 2 * PAGE), &[O::BeyondMaxGpa]),
            (unplug(A + 4 * PAGE, 4 * PAGE), &[O::Ok]),
            (resize(A + 8 * PAGE, 4 * PAGE), &[O::Ok]),
            (resize(A + 5 * PAGE, PAGE), &[O::NoSlotAt]),
            (protect(A, 16 * PAGE, Access::Ro), &[O::Hole]),
            (unplug(0, PAGE), &[O::Fixed]),
            (unplug(A + 64 * PAGE, PAGE), &[O::NotPlugged]),
            (
                mv(A, 4 * PAGE, A + 2 * PAGE),
                &[O::DestinationOverlapsSource],
            ),
        ],
    );
    // [A, A+4p) and [A+8p, A+12p): the shrink kept the slot start.
    let starts: Vec<u64> = m.slots.slots.keys().copied().filter(|s| *s >= A).collect();
    assert_eq!(starts, vec![A, A + 8 * PAGE]);
    // Protect splits, unprotect merges back.
    run(&mut m, &[(protect(A + PAGE, PAGE, Access::Ro), &[O::Ok])]);
    assert_eq!(m.slots.slots.len(), 2 + 4);
    run(&mut m, &[(protect(A, 4 * PAGE, Access::Rw), &[O::Ok])]);
    assert_eq!(m.slots.slots.len(), 2 + 2);
}

#[test]
fn test_thp_cuts_at_4k_like_anonymous_memory() {
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (thp(A + PAGE, HUGE), &[O::Ok]),
            (unplug(A + PAGE, HUGE), &[O::Ok]),
            (thp(A, 2 * HUGE), &[O::Ok]),
            (unplug(A + PAGE, PAGE), &[O::Ok]),
            (unplug(A + HUGE, HUGE), &[O::Ok]),
            (mv(A + 2 * PAGE, PAGE, A + 8 * HUGE + PAGE), &[O::Ok]),
        ],
    );
}

#[test]
fn test_contents_follow_the_memory() {
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (plug(A, 8 * PAGE), &[O::Ok]),
            (zeros(A, 8 * PAGE), &[O::Ok]),
            (fill(A, 4 * PAGE, 7), &[O::Ok]),
            (verify(A, 4 * PAGE, 7, None), &[O::Ok]),
            (verify(A, 4 * PAGE, 8, None), &[O::Mismatch]),
            // Moved memory keeps the pattern of where it was filled.
            (mv(A, 4 * PAGE, A + 64 * PAGE), &[O::Ok]),
            (verify(A + 64 * PAGE, 4 * PAGE, 7, Some(A)), &[O::Ok]),
            (verify(A, PAGE, 7, None), &[O::Unplugged]),
            // Protected: writes refused, contents kept.
            (protect(A + 64 * PAGE, 4 * PAGE, Access::Ro), &[O::Ok]),
            (fill(A + 64 * PAGE, PAGE, 9), &[O::ReadOnly]),
            (verify(A + 64 * PAGE, 4 * PAGE, 7, Some(A)), &[O::Ok]),
            // Unplug and replug: zeros.
            (unplug(A + 64 * PAGE, 4 * PAGE), &[O::Ok]),
            (plug(A + 64 * PAGE, 4 * PAGE), &[O::Ok]),
            (zeros(A + 64 * PAGE, 4 * PAGE), &[O::Ok]),
        ],
    );
    // A fill stops at the first unplugged page: pages before it are written.
    run(
        &mut m,
        &[
            (fill(A + 6 * PAGE, 4 * PAGE, 3), &[O::Unplugged]),
            (verify(A + 6 * PAGE, 2 * PAGE, 3, None), &[O::Ok]),
        ],
    );
}

#[test]
fn test_pins_veto_revoke_and_count() {
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (plug(A, 16 * PAGE), &[O::Ok]),
            (pin("hard", A, 4 * PAGE, false), &[O::Ok]),
            (pin("soft", A + 8 * PAGE, 4 * PAGE, true), &[O::Ok]),
            (pin("big", A, 16 * PAGE * 8, true), &[O::NotPlugged]),
            (pin("odd", A + 8, PAGE, true), &[O::BadRange]),
        ],
    );
    assert_eq!(m.pinned_pages(), 8);
    run(
        &mut m,
        &[
            (unplug(A, PAGE), &[O::Vetoed]),
            (protect(A, PAGE, Access::Ro), &[O::Vetoed]),
            (protect(A, PAGE, Access::Rw), &[O::Ok]),
            (unplug(A + 8 * PAGE, PAGE), &[O::Ok]),
        ],
    );
    assert_eq!(m.pinned_pages(), 4, "the revocable pin was revoked");
    run(
        &mut m,
        &[(pin("many", A + 12 * PAGE, 4 * PAGE, true), &[O::Ok])],
    );
    // 8 pinned + 64 more is past the limit of 64.
    run(
        &mut m,
        &[
            (plug(A + 32 * PAGE, 64 * PAGE), &[O::Ok]),
            (pin("limit", A + 32 * PAGE, 64 * PAGE, true), &[O::PinLimit]),
            (
                Action::Unpin(step::Unpin {
                    name: "soft".into(),
                }),
                &[O::Ok],
            ),
            (
                Action::Unpin(step::Unpin {
                    name: "soft".into(),
                }),
                &[O::NoSuchPin],
            ),
        ],
    );
}

#[test]
fn test_slot_budget_and_plug_many() {
    // Boot region and RAM take 2 of 6.
    let mut m = Model::new(layout(6));
    let many = |count| {
        Action::PlugMany(step::PlugMany {
            gpa: Num(A),
            count: Some(Num(count)),
        })
    };
    run(
        &mut m,
        &[
            (many(5), &[O::TooManySlots]),
            (many(3), &[O::Ok]),
            (plug(A + 64 * PAGE, PAGE), &[O::Ok]),
            (plug(A + 128 * PAGE, PAGE), &[O::TooManySlots]),
            // Splitting a slot in two needs one more.
            (plug(A + 256 * PAGE, PAGE), &[O::TooManySlots]),
        ],
    );
    assert_eq!(m.slots.slots.len(), 6);
}

#[test]
fn test_async_read_racing_an_unplug_widens_to_unplugged() {
    // (The step numbers count from 0: the touch is step 1.)
    let mut m = Model::new(layout(64));
    let read = Action::Touch(Guest {
        vcpu: 1,
        repeat: 1,
        is_async: true,
        command: step::Touch {
            gpa: Num(A),
            size: Num(4 * PAGE),
            stride: None,
            write: None,
        },
    });
    run(&mut m, &[(plug(A, 4 * PAGE), &[O::Ok]), (read, &[O::Ok])]);
    assert!(m.has_pending(1));
    run(&mut m, &[(unplug(A, PAGE), &[O::Ok])]);
    assert!(m.take_widenings().contains(&(1, O::Unplugged)));
    run(&mut m, &[(Action::Wait(step::Wait::collect(1)), &[O::Ok])]);
    assert!(!m.has_pending(1));
}

#[test]
fn test_dirty_pages_count_logged_guest_writes_once() {
    let mut m = Model::new(layout(64));
    let dirty = |gpa: u64, size: u64, pages: u64| {
        Action::DirtyPages(step::DirtyPages {
            gpa: Num(gpa),
            size: Num(size),
            pages: Some(DirtyWant::Count(pages)),
            maybe_pages: None,
        })
    };
    let log = Action::DirtyLog(step::DirtyLog {
        gpa: Num(A),
        size: Num(8 * PAGE),
        on: true,
    });
    run(
        &mut m,
        &[
            (plug(A, 8 * PAGE), &[O::Ok]),
            (fill(A, 2 * PAGE, 1), &[O::Ok]),
            (dirty(A, 8 * PAGE, 0), &[O::NotLogging]),
            (log, &[O::Ok]),
            (fill(A, 3 * PAGE, 1), &[O::Ok]),
            (dirty(A, PAGE, 1), &[O::Ok]),
            (dirty(A, 8 * PAGE, 3), &[O::DirtyCount]),
            (dirty(A, 8 * PAGE, 0), &[O::Ok]),
            (fill(A + 4 * PAGE, PAGE, 2), &[O::Ok]),
            // Reported by the address it was written at, after a move too.
            (mv(A + 4 * PAGE, PAGE, A + 64 * PAGE), &[O::Ok]),
            (dirty(A + 64 * PAGE, PAGE, 0), &[O::Ok]),
            (dirty(A + 4 * PAGE, PAGE, 1), &[O::Ok]),
        ],
    );
}

/// Found on real KVM: a page a vCPU only read while its slot logged may be
/// in KVM's log (shadow MMU), so a `dirty-pages` over where that slot was
/// may report it rather than refuse with `not-logging`.
#[test]
fn test_a_page_read_while_logging_may_be_reported_dirty() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/regressions/read-of-logging-page-may-be-dirty.toml"
    );
    let sc = crate::scenario::Scenario::load(std::path::Path::new(path)).unwrap();
    let mut m = Model::new(layout(64));
    let mut last = Vec::new();
    for s in &sc.steps {
        last = m.predict(&s.action);
    }
    assert!(
        last.contains(&O::NotLogging) && last.contains(&O::Ok),
        "{last:?}"
    );
    // Reported (or not) once: the next one over the range is refused.
    let again = m.predict(&sc.steps.last().unwrap().action);
    assert_eq!(again, vec![O::NotLogging]);
}

fn dirty_set(gpa: u64, size: u64, must: &[u64], maybe: &[u64]) -> Action {
    let frames = |pages: &[u64]| PageSet::from_frames(pages.iter().map(|p| p / PAGE));
    Action::DirtyPages(step::DirtyPages {
        gpa: Num(gpa),
        size: Num(size),
        pages: Some(DirtyWant::Set(frames(must))),
        maybe_pages: (!maybe.is_empty()).then(|| frames(maybe)),
    })
}

fn log_on(gpa: u64, size: u64) -> Action {
    Action::DirtyLog(step::DirtyLog {
        gpa: Num(gpa),
        size: Num(size),
        on: true,
    })
}

#[test]
fn test_a_dirty_set_of_the_right_size_but_wrong_pages_is_refused() {
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (plug(A, 8 * PAGE), &[O::Ok]),
            (log_on(A, 8 * PAGE), &[O::Ok]),
            (fill(A + 2 * PAGE, PAGE, 1), &[O::Ok]),
        ],
    );
    let mut wrong = m.clone();
    assert_eq!(
        wrong.predict(&dirty_set(A, 8 * PAGE, &[A + 3 * PAGE], &[])),
        vec![O::DirtyCount]
    );
    assert_eq!(
        m.dirty_expectation(A, 8 * PAGE),
        Some((
            PageSet::from_frames([(A + 2 * PAGE) / PAGE]),
            PageSet::default()
        ))
    );
    run(
        &mut m,
        &[
            (dirty_set(A, 8 * PAGE, &[A + 2 * PAGE], &[]), &[O::Ok]),
            (dirty_set(A, 8 * PAGE, &[], &[]), &[O::Ok]),
        ],
    );
}

#[test]
fn test_device_writes_are_dirty_in_every_slot_and_reported_once() {
    let mut m = Model::new(layout(64));
    let dma_fill = |gpa: u64, size: u64| {
        Action::DmaFill(Guest {
            vcpu: 0,
            repeat: 1,
            is_async: false,
            command: step::DmaFill {
                gpa: Num(gpa),
                size: Num(size),
                value: Num(7),
            },
        })
    };
    run(
        &mut m,
        &[
            (plug(A, 8 * PAGE), &[O::Ok]),
            (log_on(A, 4 * PAGE), &[O::Ok]),
            // The second page is in the slot that does not log: the IOMMU's
            // dirty bits do not depend on KVM's logging.
            (dma_fill(A + 3 * PAGE, 2 * PAGE), &[O::Ok]),
            (
                dirty_set(A, 8 * PAGE, &[A + 3 * PAGE, A + 4 * PAGE], &[]),
                &[O::Ok],
            ),
            (dirty_set(A, 8 * PAGE, &[], &[]), &[O::Ok]),
        ],
    );
}

/// vCPU 1 fills 2 pages at `A` with seed 9, async.
fn async_fill_on_vcpu_1() -> Action {
    Action::Fill(Guest {
        vcpu: 1,
        repeat: 1,
        is_async: true,
        command: step::Fill {
            gpa: Num(A),
            size: Num(2 * PAGE),
            seed: Num(9),
            origin: None,
        },
    })
}

#[test]
fn test_an_async_write_racing_a_move_may_land_on_either_side() {
    // Steps count from 0: the async fill is step 4.
    let mut m = Model::new(layout(64));
    let async_fill = async_fill_on_vcpu_1();
    let to = A + 64 * PAGE;
    run(
        &mut m,
        &[
            (plug(A, 4 * PAGE), &[O::Ok]),
            (plug(to - 8 * PAGE, 16 * PAGE), &[O::Ok]),
            (unplug(to, 4 * PAGE), &[O::Ok]),
            (log_on(A, 4 * PAGE), &[O::Ok]),
        ],
    );
    run(&mut m, &[(async_fill, &[O::Ok])]);
    // In flight: its pages may or may not be dirty yet, and what they hold
    // is not known.
    let (must, maybe) = m.dirty_expectation(A, 4 * PAGE).unwrap();
    assert!(must.is_empty());
    assert_eq!(maybe, PageSet::from_frames([A / PAGE, A / PAGE + 1]));
    assert_eq!(m.content_at(A).unwrap().0, guest::Content::Unknown);
    // The move races it: the write may have landed before (reported at A,
    // where it was written) or fault on the now unplugged source.
    run(&mut m, &[(mv(A, 4 * PAGE, to), &[O::Ok])]);
    let widened = m.take_widenings();
    assert!(widened.contains(&(4, O::Unplugged)), "{widened:?}");
    assert_eq!(m.dirty_expectation(A, 4 * PAGE).unwrap().1, maybe);
    // No slot logs there now: refused, unless the log kept the write.
    run(
        &mut m,
        &[(
            dirty_set(A, 4 * PAGE, &[], &[A, A + PAGE]),
            &[O::NotLogging, O::Ok],
        )],
    );
    // New logging memory plugged at A while the write is still in flight:
    // it may land there, after any report.
    let plug_logging = Action::Plug(step::Plug {
        gpa: Num(A),
        size: Num(4 * PAGE),
        backing: None,
        flags: Some(vec!["dirty-log".into()]),
    });
    run(&mut m, &[(plug_logging, &[O::Ok])]);
    assert_eq!(m.content_at(A).unwrap().0, guest::Content::Unknown);
    assert_eq!(m.dirty_expectation(A, 4 * PAGE).unwrap().1, maybe);
    run(
        &mut m,
        &[(dirty_set(A, 4 * PAGE, &[], &[A, A + PAGE]), &[O::Ok])],
    );
    assert_eq!(m.dirty_expectation(A, 4 * PAGE).unwrap().1, maybe);
    // A set that insists on a racing page is not certain.
    let mut insist = m.clone();
    assert_eq!(
        insist.predict(&dirty_set(A, 4 * PAGE, &[A], &[A + PAGE])),
        vec![O::Ok, O::DirtyCount]
    );
    run(&mut m, &[(Action::Wait(step::Wait::collect(1)), &[O::Ok])]);
    run(
        &mut m,
        &[(dirty_set(A, 4 * PAGE, &[], &[A, A + PAGE]), &[O::Ok])],
    );
    // Collected and reported: nothing is left uncertain.
    assert_eq!(
        m.dirty_expectation(A, 4 * PAGE),
        Some((PageSet::default(), PageSet::default()))
    );
}

#[test]
fn test_an_async_write_racing_a_protect_may_find_it_read_only() {
    let mut m = Model::new(layout(64));
    let async_write = Action::Write(Guest {
        vcpu: 0,
        repeat: 1,
        is_async: true,
        command: step::Write {
            gpa: Num(A + 8),
            value: Num(5),
        },
    });
    run(
        &mut m,
        &[
            (plug(A, 4 * PAGE), &[O::Ok]),
            (async_write, &[O::Ok]),
            (protect(A, PAGE, Access::Ro), &[O::Ok]),
        ],
    );
    let widened = m.take_widenings();
    assert!(widened.contains(&(1, O::ReadOnly)), "{widened:?}");
}

/// Found by the sim tier once it ran DMA: the IOMMU reports a dirty 2 MiB
/// leaf's every frame, so a device write into THP memory may report the
/// rest of its 2 MiB region; the written pages must be reported.
#[test]
fn test_a_device_write_into_thp_may_report_its_2m_leaf() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/regressions/dma-into-thp-dirties-its-2m-leaf.toml"
    );
    let sc = crate::scenario::Scenario::load(std::path::Path::new(path)).unwrap();
    let mut m = Model::new(layout(64));
    for s in &sc.steps {
        assert_eq!(m.predict(&s.action), vec![O::Ok], "{:?}", s.action);
    }
    // Without the maybe pages, the report of the whole leaf may fail.
    let mut m = Model::new(layout(64));
    for s in &sc.steps[..2] {
        m.predict(&s.action);
    }
    let a = 0x1_0363_d000;
    let strict = dirty_set(0x1_0360_0000, 2 << 20, &[a, a + PAGE], &[]);
    assert_eq!(m.predict(&strict), vec![O::Ok, O::DirtyCount]);
}

#[test]
fn test_an_async_dma_fill_racing_an_unplug_may_have_dirtied_its_pages() {
    let mut m = Model::new(layout(64));
    let fill = Action::DmaFill(Guest {
        vcpu: 1,
        repeat: 1,
        is_async: true,
        command: step::DmaFill {
            gpa: Num(A),
            size: Num(2 * PAGE),
            value: Num(3),
        },
    });
    run(
        &mut m,
        &[
            (plug(A, 4 * PAGE), &[O::Ok]),
            (log_on(A, 4 * PAGE), &[O::Ok]),
            (fill, &[O::Ok]),
            (unplug(A + PAGE, PAGE), &[O::Ok]),
        ],
    );
    let widened = m.take_widenings();
    assert!(widened.contains(&(2, O::DmaRevoked)), "{widened:?}");
    // Written before the unplug, partly, or not at all.
    let (must, maybe) = m.dirty_expectation(A, 4 * PAGE).unwrap();
    assert!(must.is_empty(), "{must:?}");
    assert_eq!(maybe, PageSet::from_frames([A / PAGE, A / PAGE + 1]));
    assert_eq!(m.content_at(A).unwrap().0, guest::Content::Unknown);
    run(
        &mut m,
        &[
            (Action::Wait(step::Wait::collect(1)), &[O::Ok]),
            (dirty_set(A, 4 * PAGE, &[], &[A, A + PAGE]), &[O::Ok]),
            (dirty_set(A, 4 * PAGE, &[], &[]), &[O::Ok]),
        ],
    );
}

#[test]
fn test_an_async_write_nothing_raced_is_certainly_dirty_after_its_wait() {
    let mut m = Model::new(layout(64));
    let async_fill = async_fill_on_vcpu_1();
    run(
        &mut m,
        &[
            (plug(A, 4 * PAGE), &[O::Ok]),
            (log_on(A, 4 * PAGE), &[O::Ok]),
            (async_fill, &[O::Ok]),
            // Elsewhere: no race.
            (plug(A + 64 * PAGE, PAGE), &[O::Ok]),
            (dirty_set(A + 64 * PAGE, PAGE, &[], &[]), &[O::NotLogging]),
        ],
    );
    let pages = PageSet::from_frames([A / PAGE, A / PAGE + 1]);
    assert_eq!(m.dirty_expectation(A, 4 * PAGE).unwrap().1, pages);
    run(&mut m, &[(Action::Wait(step::Wait::collect(1)), &[O::Ok])]);
    assert_eq!(
        m.dirty_expectation(A, 4 * PAGE),
        Some((pages, PageSet::default()))
    );
    // Missing one of them is a finding now.
    let mut missing = m.clone();
    assert_eq!(
        missing.predict(&dirty_set(A, 4 * PAGE, &[A], &[])),
        vec![O::DirtyCount]
    );
    // And its pages hold what it wrote: a verify with its seed must pass,
    // one with another seed must fail (while in flight either was allowed).
    run(
        &mut m,
        &[
            (verify(A, 2 * PAGE, 9, None), &[O::Ok]),
            (verify(A, 2 * PAGE, 8, None), &[O::Mismatch]),
        ],
    );
}

#[test]
fn test_an_async_write_raced_by_a_move_leaves_its_pages_unknown_after_its_wait() {
    let mut m = Model::new(layout(64));
    let async_fill = async_fill_on_vcpu_1();
    let to = A + 64 * PAGE;
    run(
        &mut m,
        &[
            (plug(A, 4 * PAGE), &[O::Ok]),
            (async_fill, &[O::Ok]),
            (mv(A, 4 * PAGE, to), &[O::Ok]),
        ],
    );
    run(&mut m, &[(Action::Wait(step::Wait::collect(1)), &[O::Ok])]);
    // The fill may have landed before the move (and moved with the memory)
    // or faulted after it: what the pages hold is not known.
    assert_eq!(m.content_at(to).unwrap().0, guest::Content::Unknown);
}

/// KVM_MEM_MAX_NR_PAGES per memslot: a larger plug or grow is
/// `slot-too-large` (never `backing`: the slot map judges it before any
/// memory is mapped), and a grow in place past the limit is a second slot.
#[test]
fn test_memslots_above_kvm_max_pages_are_refused_and_not_merged() {
    use crate::mm::slot_map::MAX_MEMSLOT_PAGES;
    let max = MAX_MEMSLOT_PAGES * PAGE;
    let mut m = Model::new(layout(64));
    run(
        &mut m,
        &[
            (plug(A, max + PAGE), &[O::SlotTooLarge]),
            (
                resize(0x4000_0000, (64 << 20) + max + PAGE),
                &[O::SlotTooLarge],
            ),
            // Whole 2 MiB host pages: the mapping is 8 TiB, one page more
            // than the slot; growing into it cannot merge.
            (thp(A, max), &[O::Ok, O::Backing]),
            (resize(A, max + PAGE), &[O::Ok]),
        ],
    );
    let lens: Vec<u64> = m.slots.slots.range(A..).map(|(_, s)| s.len).collect();
    assert_eq!(lens, [max, PAGE]);
}

/// A device write of many pages into THP memory notes each 2 MiB leaf
/// once: the written frames must be reported, the rest of each leaf's
/// region in the slot may be, in every region the write reaches.
#[test]
fn test_a_dma_across_two_thp_leaves_may_report_both_regions() {
    let mut m = Model::new(layout(64));
    assert_eq!(m.predict(&thp(A, 2 * HUGE)), vec![O::Ok]);
    let (gpa, size) = (A + HUGE - 2 * PAGE, 4 * PAGE);
    let fill = Action::DmaFill(Guest {
        vcpu: 0,
        repeat: 1,
        is_async: false,
        command: step::DmaFill {
            gpa: Num(gpa),
            size: Num(size),
            value: Num(1),
        },
    });
    assert_eq!(m.predict(&fill), vec![O::Ok]);
    let (must, maybe) = m.dirty_expectation(A, 2 * HUGE).unwrap();
    assert_eq!(
        must,
        PageSet::from_frames((gpa / PAGE)..(gpa + size) / PAGE)
    );
    let rest = (A / PAGE..(A + 2 * HUGE) / PAGE)
        .filter(|f| !(gpa / PAGE..(gpa + size) / PAGE).contains(f));
    assert_eq!(maybe, PageSet::from_frames(rest));
}
