//! The file format's refusals (each names `file:line:column`, the step and
//! the field), the shipped examples, and the TOML round trip.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::step::{Action, Step, MAX_REPEAT};
use super::{Scenario, ScenarioError};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    files
}

/// The first line of the refusal of `text`.
fn refusal(text: &str) -> String {
    let e = Scenario::parse(text).expect_err(text).to_string();
    e.lines().next().unwrap_or_default().to_string()
}

/// Asserts the refusal of `text` starts with `scenario:line:column: step N`
/// and names `field`.
fn assert_refused(text: &str, at: &str, step: usize, field: &str) {
    let first = refusal(text);
    assert!(
        first.starts_with(&format!("scenario:{at}: step {step} ")),
        "{text}\n=> {first}"
    );
    assert!(first.contains(&format!("`{field}`")), "{text}\n=> {first}");
}

const PLUG: &str = "[[step]]\ndo = \"plug\"\ngpa = \"0x1_0000_0000\"\nsize = \"2M\"\n";

#[test]
fn test_every_example_parses_and_round_trips() {
    for path in examples() {
        let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (i, step) in s.steps.iter().enumerate() {
            let text = step.to_toml();
            let again = Step::parse_toml(&text)
                .unwrap_or_else(|e| panic!("{} step {}: {e}\n{text}", path.display(), i + 1));
            assert_eq!(&again, step, "{} step {}:\n{text}", path.display(), i + 1);
        }
        let whole = s.to_toml();
        assert_eq!(Scenario::parse(&whole).unwrap(), s, "{}", path.display());
    }
}

#[test]
fn test_field_of_another_kind_is_refused_at_its_place() {
    // `access` belongs to protect, `repeat` and `async` to guest commands.
    assert_refused(
        &format!("{PLUG}[[step]]\ndo = \"unplug\"\ngpa = 0\nsize = 4096\naccess = \"ro\"\n"),
        "9:1",
        2,
        "access",
    );
    assert_refused(&format!("{PLUG}repeat = 2\n"), "5:1", 1, "repeat");
    assert_refused(
        "[[step]]\ndo = \"move\"\ngpa = 0\nsize = 4096\nto = 8192\nasync = true\n",
        "6:1",
        1,
        "async",
    );
    assert_refused(
        "[[step]]\ndo = \"wait\"\nvcpu = 0\nrepeat = 3\n",
        "4:1",
        1,
        "repeat",
    );
    let first = refusal(&format!("{PLUG}colour = 1\n"));
    assert!(first.contains("unknown field `colour`"), "{first}");
}

#[test]
fn test_missing_field_and_unknown_kind_are_named() {
    assert_refused("[[step]]\ndo = \"plug\"\ngpa = 4096\n", "1:1", 1, "size");
    assert!(refusal("[[step]]\ndo = \"plug\"\ngpa = 4096\n").contains("needs `size`"));
    let first = refusal("\n[[step]]\ndo = \"teleport\"\n");
    assert!(
        first.starts_with("scenario:3:6: step 1 (teleport): `do`: unknown step kind \"teleport\""),
        "{first}"
    );
    assert_refused(
        "[[step]]\ndo = \"plug\"\ngpa = true\nsize = 1\n",
        "3:7",
        1,
        "gpa",
    );
}

#[test]
fn test_unknown_expectation_is_refused() {
    assert_refused(
        &format!("{PLUG}expect = \"sideways\"\n"),
        "5:10",
        1,
        "expect",
    );
    // A read of another value is a `mismatch`; the old name is gone.
    assert_refused(
        "[[step]]\ndo = \"read\"\ngpa = 0\nvalue = 1\nexpect = \"wrong-value\"\n",
        "5:10",
        1,
        "expect",
    );
    let s = Scenario::parse("[[step]]\ndo = \"read\"\ngpa = 0\nvalue = 1\nexpect = \"mismatch\"\n");
    assert!(s.is_ok(), "{s:?}");
}

#[test]
fn test_expectation_a_step_cannot_meet_is_refused() {
    assert_refused(
        &format!("{PLUG}expect = \"mismatch\"\n"),
        "5:10",
        1,
        "expect",
    );
    let first = refusal(&format!("{PLUG}expect = \"ok|dma-revoked\"\n"));
    assert!(
        first.contains("never ends with `dma-revoked`") && first.contains("overlap"),
        "{first}"
    );
    assert_refused(
        "[[step]]\ndo = \"wait\"\nexpect = \"unplugged\"\n",
        "3:10",
        1,
        "expect",
    );
    assert_refused(
        "[[step]]\ndo = \"unpin\"\nname = \"x\"\nexpect = \"overlap\"\n",
        "4:10",
        1,
        "expect",
    );
    for ok in [
        "[[step]]\ndo = \"unpin\"\nname = \"x\"\nexpect = \"no-such-pin\"\n",
        "[[step]]\ndo = \"dma-copy\"\ngpa = 0\nto = 4096\nsize = 8\nexpect = \"ok|dma-revoked\"\n",
        "[[step]]\ndo = \"check\"\npages = 1\nexpect = \"pinned-pages\"\n",
        "[[step]]\ndo = \"sleep\"\nduration = \"1ms\"\nexpect = \"error\"\n",
    ] {
        assert!(Scenario::parse(ok).is_ok(), "{ok}");
    }
}

#[test]
fn test_vcpu_beyond_the_scenarios_vcpus_is_refused() {
    assert_refused(
        "vcpus = 2\n[[step]]\ndo = \"read\"\ngpa = 0\nvcpu = 2\n",
        "5:1",
        1,
        "vcpu",
    );
    assert_refused(
        "vcpus = 1\n[[step]]\ndo = \"wait\"\nvcpu = 1\n",
        "4:1",
        1,
        "vcpu",
    );
    assert_refused(
        "[[step]]\ndo = \"read\"\ngpa = 0\nvcpu = 64\n",
        "4:1",
        1,
        "vcpu",
    );
    assert!(Scenario::parse("vcpus = 2\n[[step]]\ndo = \"read\"\ngpa = 0\nvcpu = 1\n").is_ok());
}

#[test]
fn test_bad_guest_ranges_are_refused() {
    assert_refused(
        "[[step]]\ndo = \"touch\"\ngpa = 0\nsize = 4096\nstride = 0\n",
        "5:1",
        1,
        "stride",
    );
    assert_refused(
        "[[step]]\ndo = \"verify\"\ngpa = \"0xffff_ffff_ffff_fff8\"\nsize = 16\nseed = 1\n",
        "4:1",
        1,
        "size",
    );
    assert_refused(
        "[[step]]\ndo = \"fill\"\ngpa = \"0x1004\"\nsize = 16\nseed = 1\n",
        "3:1",
        1,
        "gpa",
    );
    assert_refused(
        "[[step]]\ndo = \"verify-const\"\ngpa = \"0x1000\"\nsize = 12\nvalue = 0\n",
        "4:1",
        1,
        "size",
    );
    assert_refused(
        "[[step]]\ndo = \"dma-copy\"\ngpa = 0\nto = \"0xffff_ffff_ffff_f000\"\nsize = \"8K\"\n",
        "4:1",
        1,
        "to",
    );
    assert_refused(
        "[[step]]\ndo = \"read\"\ngpa = \"0xffff_ffff_ffff_fffc\"\n",
        "3:1",
        1,
        "gpa",
    );
}

#[test]
fn test_repeat_and_count_caps() {
    let over = MAX_REPEAT + 1;
    assert_refused(
        &format!("[[step]]\ndo = \"spin\"\niterations = 1\nrepeat = {over}\n"),
        "4:1",
        1,
        "repeat",
    );
    assert!(refusal(&format!(
        "[[step]]\ndo = \"spin\"\niterations = 1\nrepeat = {over}\n"
    ))
    .contains("1000000"));
    assert_refused(
        "[[step]]\ndo = \"spin\"\niterations = 1\nrepeat = 0\n",
        "4:1",
        1,
        "repeat",
    );
    assert_refused(
        "[[step]]\ndo = \"plug-many\"\ngpa = \"64G\"\ncount = 32765\n",
        "4:1",
        1,
        "count",
    );
    assert!(Scenario::parse(&format!(
        "[[step]]\ndo = \"spin\"\niterations = 1\nrepeat = {MAX_REPEAT}\n"
    ))
    .is_ok());
}

#[test]
fn test_header_timeout_is_read_and_checked() {
    let s = Scenario::parse(&format!("timeout = \"90s\"\n{PLUG}")).unwrap();
    assert_eq!(
        s.timeout.map(|t| t.duration()),
        Some(Duration::from_secs(90))
    );
    let first = refusal(&format!("timeout = \"soon\"\n{PLUG}"));
    assert!(
        first.starts_with("scenario:1:11: `timeout`:") && first.contains("soon"),
        "{first}"
    );
    let first = refusal(&format!("colour = 1\n{PLUG}"));
    assert!(
        first.starts_with("scenario:1:1: `colour`: unknown field"),
        "{first}"
    );
}

#[test]
fn test_async_without_wait_is_refused_naming_the_step() {
    let text = "[[step]]\ndo = \"read\"\ngpa = 0\nasync = true\n[[step]]\ndo = \"read\"\ngpa = 0\n";
    assert_refused(text, "5:1", 2, "vcpu");
    assert!(refusal(text).contains("add a `wait` step"));
    let first = refusal("[[step]]\ndo = \"read\"\ngpa = 0\nasync = true\n");
    assert!(
        first.starts_with("scenario:1:1: step 1: `async`:") && first.contains("never collected"),
        "{first}"
    );
}

#[test]
fn test_files_that_are_not_small_regular_files_fail_fast() {
    let started = Instant::now();
    let e = Scenario::load(Path::new("/dev/zero")).unwrap_err();
    assert!(matches!(e, ScenarioError::NotAFile { .. }), "{e}");
    assert!(e.to_string().contains("1048576 bytes"), "{e}");

    let dir = std::env::temp_dir().join(format!("vmm-scenario-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = Scenario::load(&fifo).unwrap_err().to_string();
    assert!(e.contains("a FIFO") && e.contains("regular file"), "{e}");

    let big = dir.join("big.toml");
    std::fs::write(&big, vec![b'#'; (super::file::MAX_FILE_SIZE + 1) as usize]).unwrap();
    let e = Scenario::load(&big).unwrap_err().to_string();
    assert!(e.contains("too large") && e.contains("limit"), "{e}");
    let e = Scenario::load(&dir).unwrap_err().to_string();
    assert!(e.contains("a directory"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn test_line_and_column_count_characters() {
    // A multi-byte character before the field on its line.
    let first = refusal("name = \"é\"\n[[step]]\ndo = \"read\"\ngpa = 0\n  stride = 4\n");
    assert!(
        first.starts_with("scenario:5:3: step 1 (read): `stride`"),
        "{first}"
    );
}

#[test]
fn test_typed_steps_compare_by_meaning() {
    let a = Step::parse_toml("do = \"read\"\ngpa = 4096\nexpect = \"ok-or-unplugged\"").unwrap();
    let b = Step::parse_toml("do = \"read\"\ngpa = \"4K\"\nexpect = \"ok|unplugged\"").unwrap();
    assert_eq!(a, b);
    assert!(matches!(a.action, Action::Read(_)));
    assert_eq!(a.action.vcpu(), Some(0));
}

#[test]
fn test_note_control_characters_are_escaped() {
    let s = super::driver::escape_control("done\u{1b}[2J\nnext\ttab é");
    assert_eq!(s, "done\\u{1b}[2J\\nnext\\ttab é");
}

/// Runs memory and pin steps (no guest) on the simulated KVM.
fn run_on_sim(text: &str) -> super::ScenarioReport {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use crate::devices::iommu::Iommu;
    use crate::devices::pins::PinManager;
    use crate::mm::backing::BackingKind;
    use crate::mm::manager::{MemoryManager, SimKvm};
    use crate::mm::pin_account::{PinAccount, PinLimit};
    use crate::mm::slot_map::SlotMapConfig;

    let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
    let account = Arc::new(PinAccount::new(PinLimit::Unlimited));
    super::driver::Driver {
        scenario: Arc::new(Scenario::parse(text).unwrap()),
        memory: memory.clone(),
        backing: BackingKind::Anon,
        links: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
        pins: Arc::new(PinManager::new(memory.clone(), account)),
        iommu: Arc::new(Iommu::new(memory)),
        held: Default::default(),
        console: Box::new(|_| {}),
    }
    .run()
}

#[test]
fn test_second_pin_under_a_held_name_is_refused_and_changes_nothing() {
    let report = run_on_sim(&format!(
        "{PLUG}
        [[step]]
        do = \"pin\"
        name = \"a\"
        gpa = \"0x1_0000_0000\"
        size = \"1M\"
        revocable = false
        [[step]]
        do = \"pin\"
        name = \"a\"
        gpa = \"0x1_0010_0000\"
        size = \"4K\"
        expect = \"duplicate-pin\"
        [[step]]
        do = \"check\"
        pages = 256
        [[step]]
        do = \"unplug\"
        gpa = \"0x1_0000_0000\"
        size = \"4K\"
        expect = \"vetoed\"
        [[step]]
        do = \"unpin\"
        name = \"a\"
        [[step]]
        do = \"check\"
        pages = 0
        "
    ));
    assert!(report.passed, "{:?}", report.failure());
}

#[test]
fn test_memory_steps_on_sim_kvm_end_with_a_passing_full_check() {
    let report = run_on_sim(&format!(
        "full_check_every = 2
        {PLUG}
        [[step]]
        do = \"dirty-pages\"
        gpa = \"0x1_0000_0000\"
        size = \"2M\"
        expect = \"not-logging\"
        [[step]]
        do = \"resize\"
        gpa = \"0x1_0000_0000\"
        new_size = \"6M\"
        [[step]]
        do = \"resize\"
        gpa = \"0x1_0000_0000\"
        new_size = \"1M\"
        [[step]]
        do = \"plug-many\"
        gpa = \"0xffff_ffff_f000\"
        count = 2
        expect = \"beyond-max-gpa\"
        [[step]]
        do = \"plug\"
        gpa = \"0xffff_ffff_f000\"
        size = \"4K\"
        "
    ));
    assert!(report.passed, "{:?}", report.failure());
    assert_eq!(report.steps.len(), 6);
}

#[test]
fn test_dirty_pages_takes_a_count_or_a_set_of_page_runs() {
    use super::pages::{DirtyWant, PageSet};
    let parse = |pages: &str| {
        let text = format!("do = \"dirty-pages\"\ngpa = 0\nsize = \"1M\"\n{pages}");
        Step::parse_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
    };
    let Action::DirtyPages(d) = parse("pages = 3").action else {
        panic!("dirty-pages")
    };
    assert_eq!(d.pages, Some(DirtyWant::Count(3)), "the older count form");
    let step = parse("pages = [\"0x2000+2\", \"0x1000\", \"0x9000\"]\nmaybe_pages = [\"0x5000\"]");
    let Action::DirtyPages(d) = &step.action else {
        panic!("dirty-pages")
    };
    let set: PageSet = ["0x1000+3", "0x9000"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(d.pages, Some(DirtyWant::Set(set)));
    assert_eq!(d.maybe_pages.as_ref().map(|m| m.len()), Some(1));
    // Written back normalized, and read as the same step.
    let text = step.to_toml();
    assert!(
        text.contains("pages = [\"0x1000+3\", \"0x9000\"]"),
        "{text}"
    );
    assert_eq!(Step::parse_toml(&text).unwrap(), step);
    let Action::DirtyPages(d) = parse("pages = []").action else {
        panic!("dirty-pages")
    };
    assert_eq!(d.pages, Some(DirtyWant::Set(PageSet::default())));
}

#[test]
fn test_bad_dirty_page_sets_are_refused_naming_the_field() {
    let step =
        |fields: &str| format!("[[step]]\ndo = \"dirty-pages\"\ngpa = 0\nsize = \"1M\"\n{fields}");
    assert_refused(&step("pages = [\"0x1001\"]"), "5:9", 1, "pages");
    assert!(refusal(&step("pages = [\"0x1001\"]")).contains("not 4 KiB aligned"));
    assert_refused(&step("pages = [\"0x1000+0\"]"), "5:9", 1, "pages");
    assert_refused(&step("pages = -1"), "5:9", 1, "pages");
    assert_refused(
        &step("pages = [\"0x1000\"]\nmaybe_pages = [\"x\"]"),
        "6:15",
        1,
        "maybe_pages",
    );
    let count_and_maybe = step("pages = 2\nmaybe_pages = [\"0x1000\"]");
    let e = refusal(&count_and_maybe);
    assert!(
        e.contains("`maybe_pages`") && e.contains("list of page runs"),
        "{e}"
    );
}

const ASYNC_READS: &str = "[[step]]\ndo = \"read\"\ngpa = 0\nrepeat = 5\nasync = true\n";

#[test]
fn test_wait_for_some_commands_reads_and_round_trips() {
    let s = Scenario::parse(&format!(
        "{ASYNC_READS}[[step]]\ndo = \"wait\"\ncompleted = 5\nwithin = \"2s\"\n\
         [[step]]\ndo = \"wait\"\ncompleted = 1\n[[step]]\ndo = \"wait\"\n"
    ))
    .unwrap();
    let Action::Wait(w) = &s.steps[1].action else {
        panic!("a wait: {:?}", s.steps[1])
    };
    assert_eq!(w.completed, Some(5));
    assert_eq!(
        w.within.as_ref().map(|d| d.duration()),
        Some(Duration::from_secs(2))
    );
    assert_eq!(Scenario::parse(&s.to_toml()).unwrap(), s);
    // A plain wait writes no new field.
    assert_eq!(s.steps[3].to_toml(), "do = \"wait\"\nvcpu = 0\n");
}

#[test]
fn test_bad_wait_for_some_commands_is_refused_naming_the_field() {
    let wait = |fields: &str| format!("{ASYNC_READS}[[step]]\ndo = \"wait\"\n{fields}\n");
    for (fields, at, field, says) in [
        ("completed = 0", "8:1", "completed", "at least 1"),
        ("completed = 1000001", "8:1", "completed", "above"),
        ("completed = -1", "8:13", "completed", ""),
        ("completed = 6", "8:1", "completed", "step 1 runs 5"),
        ("within = \"1s\"", "8:1", "within", "goes with `completed`"),
        (
            "completed = 1\nwithin = \"0s\"",
            "9:10",
            "within",
            "at least 1ms",
        ),
        ("completed = 1\nwithin = \"soon\"", "9:10", "within", "soon"),
    ] {
        let text = wait(fields);
        assert_refused(&text, at, 2, field);
        assert!(
            refusal(&text).contains(says),
            "{fields}: {}",
            refusal(&text)
        );
    }
    // Nothing in flight on the vCPU: before any async step, after a plain
    // wait collected it, or on another vCPU.
    for text in [
        "[[step]]\ndo = \"wait\"\ncompleted = 1\n".to_string(),
        format!("{ASYNC_READS}[[step]]\ndo = \"wait\"\n[[step]]\ndo = \"wait\"\ncompleted = 1\n"),
        format!("vcpus = 2\n{ASYNC_READS}[[step]]\ndo = \"wait\"\nvcpu = 1\ncompleted = 1\n[[step]]\ndo = \"wait\"\n"),
    ] {
        let first = refusal(&text);
        assert!(
            first.contains("`completed`") && first.contains("no async commands in flight"),
            "{text}\n=> {first}"
        );
    }
    // A wait for some commands collects nothing: the batch still needs a
    // plain wait before the vCPU's next command and before the end.
    let first = refusal(&wait("completed = 1"));
    assert!(first.contains("never collected"), "{first}");
    let text = format!(
        "{ASYNC_READS}[[step]]\ndo = \"wait\"\ncompleted = 1\n[[step]]\ndo = \"read\"\ngpa = 0\n"
    );
    assert!(
        refusal(&text).contains("add a `wait` step"),
        "{}",
        refusal(&text)
    );
}

/// Runs `text` (no memory ops) with vCPU 0 played by a thread that finishes
/// one command per value received on the returned sender (a `read` seeing
/// that value); console lines arrive on the returned receiver as the steps
/// end, and the report when the scenario does.
fn run_with_scripted_vcpu(
    text: &str,
) -> (
    std::sync::mpsc::Sender<u64>,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<super::ScenarioReport>,
) {
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};

    use crate::devices::iommu::Iommu;
    use crate::devices::pins::PinManager;
    use crate::mm::backing::BackingKind;
    use crate::mm::manager::{MemoryManager, SimKvm};
    use crate::mm::pin_account::{PinAccount, PinLimit};
    use crate::mm::slot_map::SlotMapConfig;
    use crate::plan::{CommandOutcome, Step as PlanStep, VcpuPlan};

    let stop = Arc::new(AtomicBool::new(false));
    let (mut plan, link) = super::driver::channel_pair(stop.clone());
    let (values, script) = mpsc::channel::<u64>();
    std::thread::spawn(move || {
        while let Ok(PlanStep::Run(_)) = plan.next() {
            let Ok(value) = script.recv() else { return };
            plan.completed(&CommandOutcome::Done {
                results: [value, 0, 0, 0, 0, 0],
            });
        }
    });
    let (lines, console) = mpsc::channel();
    let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
    let account = Arc::new(PinAccount::new(PinLimit::Unlimited));
    let driver = super::driver::Driver {
        scenario: Arc::new(Scenario::parse(text).unwrap()),
        memory: memory.clone(),
        backing: BackingKind::Anon,
        links: vec![link],
        stop,
        pins: Arc::new(PinManager::new(memory.clone(), account)),
        iommu: Arc::new(Iommu::new(memory)),
        held: Default::default(),
        console: Box::new(move |line| {
            let _ = lines.send(line);
        }),
    };
    (values, console, std::thread::spawn(move || driver.run()))
}

const LONG: Duration = Duration::from_secs(10);

#[test]
fn test_wait_for_some_commands_returns_once_that_many_finished() {
    let text = format!(
        "{ASYNC_READS}[[step]]\ndo = \"wait\"\ncompleted = 2\nwithin = \"1m\"\n[[step]]\ndo = \"wait\"\n"
    );
    let (vcpu, console, run) = run_with_scripted_vcpu(&text);
    let started = console.recv_timeout(LONG).unwrap();
    assert!(
        started.starts_with("step 1: ") && started.contains("started 5"),
        "{started}"
    );
    vcpu.send(0).unwrap();
    // One of two: the wait goes on.
    assert!(console.recv_timeout(Duration::from_millis(300)).is_err());
    vcpu.send(0).unwrap();
    let line = console.recv_timeout(LONG).unwrap();
    assert!(
        line.starts_with("step 2: vCPU 0: wait until 2 of its async commands finished")
            && line.contains("2 of step 1's commands finished (as expected"),
        "{line}"
    );
    // The batch ran on: the plain wait collects all five.
    assert!(console.recv_timeout(Duration::from_millis(300)).is_err());
    for _ in 0..3 {
        vcpu.send(0).unwrap();
    }
    let line = console.recv_timeout(LONG).unwrap();
    assert!(line.contains("5 outcome(s) as expected"), "{line}");
    let report = run.join().unwrap();
    assert!(report.passed, "{:?}", report.failure());
}

#[test]
fn test_wait_for_some_commands_fails_past_its_bound_naming_the_step() {
    let text = format!(
        "{ASYNC_READS}[[step]]\ndo = \"wait\"\ncompleted = 2\nwithin = \"100ms\"\n[[step]]\ndo = \"wait\"\n"
    );
    let (vcpu, _console, run) = run_with_scripted_vcpu(&text);
    vcpu.send(0).unwrap();
    let started = Instant::now();
    let report = run.join().unwrap();
    assert!(started.elapsed() < LONG);
    let failure = report.failure().unwrap();
    assert!(
        failure.contains(
            "step 2 (vCPU 0: wait until 2 of its async commands finished (within 100ms))"
        ) && failure
            .contains("timed out: 1 of step 1's commands finished within 100.0 ms, waiting for 2"),
        "{failure}"
    );
    assert_eq!(report.not_run, 1);
}

#[test]
fn test_wait_for_some_commands_fails_when_the_batch_stops_short() {
    // The second read sees another value: the batch ends there, the wait
    // reports that outcome as a plain wait would.
    let text = "[[step]]\ndo = \"read\"\ngpa = 0\nvalue = 7\nrepeat = 5\nasync = true\n\
                [[step]]\ndo = \"wait\"\ncompleted = 3\n[[step]]\ndo = \"wait\"\n";
    let (vcpu, _console, run) = run_with_scripted_vcpu(text);
    vcpu.send(7).unwrap();
    vcpu.send(8).unwrap();
    let failure = run.join().unwrap().failure().unwrap();
    assert!(
        failure.contains("step 2 (") && failure.contains("step 1: read 0x8, expected 0x7"),
        "{failure}"
    );
    // Every command finished before the wait began: it collects the batch,
    // and the plain wait after it has nothing left.
    let (vcpu, _console, run) = run_with_scripted_vcpu(&format!(
        "{ASYNC_READS}[[step]]\ndo = \"sleep\"\nduration = \"200ms\"\n\
         [[step]]\ndo = \"wait\"\ncompleted = 5\n[[step]]\ndo = \"wait\"\n"
    ));
    for _ in 0..5 {
        vcpu.send(0).unwrap();
    }
    let report = run.join().unwrap();
    assert!(report.passed, "{:?}", report.failure());
    assert!(
        report.steps[2].actual.contains("5 outcome(s)"),
        "{:?}",
        report.steps[2]
    );
    assert!(
        report.steps[3].actual.contains("0 outcome(s)"),
        "{:?}",
        report.steps[3]
    );
}
