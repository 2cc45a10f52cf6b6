//! The three dirty-log modes on real KVM: exact dirty sets, a tiny ring
//! filling up, slot id reuse after a delete, and a logging slot split and
//! moved while a vCPU writes into it.
//!
//! A vCPU runs the ring-3 runtime driven by [`Remote`]: the test sends each
//! guest command and waits for its outcome, so it knows exactly which pages
//! the guest wrote and when.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::mm::addr::{Gfn, Gpa, GpaRange, PAGE_SIZE};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::manager::{DirtyLogMode, MemoryManager, MemslotError};
use vmm::mm::slot_map::SlotFlags;
use vmm::plan::{Command, CommandOutcome, Step, VcpuPlan};
use vmm::vcpu::{ConsoleSender, VcpuContext, VcpuReport};
use vmm::vm::{DirtyLogConfig, Vm, VmSpec};
use vmm_sys_util::eventfd::EventFd;
use vmm_tests::kvm_or_skip;

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;
/// Where the tests plug their logging memory (outside guest RAM).
const BASE: u64 = 0x1_0000_0000;

/// A plan whose commands come from the test, one at a time.
struct Remote {
    commands: Receiver<Command>,
    outcomes: Sender<CommandOutcome>,
}

impl VcpuPlan for Remote {
    fn next(&mut self) -> Result<Step, vmm::plan::Aborted> {
        Ok(self.commands.recv().map_or(Step::Stop, Step::Run))
    }
    fn completed(&mut self, outcome: &CommandOutcome) {
        let _ = self.outcomes.send(outcome.clone());
    }
    fn recoverable(&self) -> bool {
        true
    }
}

/// A VM with remotely driven vCPUs (one unless [`Guest::with_vcpus`]).
struct Guest {
    vm: Vm,
    /// Per vCPU: its command channel and its outcomes (a vCPU is driven
    /// by one thread at a time).
    vcpus: Vec<(Sender<Command>, Mutex<Receiver<CommandOutcome>>)>,
    threads: Vec<JoinHandle<VcpuReport>>,
    _console: Mutex<mpsc::Receiver<vmm::vcpu::ConsoleLine>>,
}

impl Guest {
    fn new(dirty: DirtyLogConfig) -> Self {
        Self::with_vcpus(dirty, 1)
    }

    fn with_vcpus(dirty: DirtyLogConfig, count: u64) -> Self {
        let mut vm = Vm::with_dirty_log(
            &VmSpec {
                vcpus: count,
                mem_size: 16 * MIB,
                backing: BackingKind::Anon,
                image: Arc::from(guest_image::RUNTIME_ELF),
                pin_limit: None,
                hotplug: true,
                kvm_stats: true,
                memslot_zap: vmm::kvm::zap::MemslotZap::default(),
            },
            dirty,
        )
        .expect("the VM builds");
        let (console_tx, console_rx) = mpsc::channel();
        let mut vcpus = Vec::new();
        let mut threads = Vec::new();
        for (index, fd) in vm.take_vcpus().into_iter().enumerate() {
            let (ctx_tx, commands) = mpsc::channel();
            let (outcomes_tx, outcomes) = mpsc::channel();
            let ctx = VcpuContext {
                index: index as u64,
                vcpus: count,
                entry: vm.entry,
                boot: vm.boot.clone(),
                memory: vm.memory.clone(),
                dma: None,
                plan: Box::new(Remote {
                    commands,
                    outcomes: outcomes_tx,
                }),
                console: ConsoleSender::new(console_tx.clone(), EventFd::new(0).unwrap()),
                stop: Arc::new(AtomicBool::new(false)),
                progress: false,
            };
            threads.push(std::thread::spawn(move || vmm::vcpu::run_vcpu(fd, ctx)));
            vcpus.push((ctx_tx, Mutex::new(outcomes)));
        }
        Self {
            vm,
            vcpus,
            threads,
            _console: Mutex::new(console_rx),
        }
    }

    fn memory(&self) -> &Arc<MemoryManager> {
        &self.vm.memory
    }

    fn run(&self, command: Command) -> CommandOutcome {
        self.run_on(0, command)
    }

    fn run_on(&self, vcpu: usize, command: Command) -> CommandOutcome {
        let (commands, outcomes) = &self.vcpus[vcpu];
        commands.send(command).unwrap();
        outcomes
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(60))
            .expect("the guest answers within 60 s")
    }

    fn must(&self, command: Command) {
        let outcome = self.run(command);
        assert!(
            matches!(outcome, CommandOutcome::Done { .. }),
            "{outcome:?}"
        );
    }

    /// Writes one word in each of `pages` (guest-physical page numbers).
    fn write_pages(&self, pages: impl IntoIterator<Item = u64>) {
        for p in pages {
            self.must(Command::write(p * P + 8, p));
        }
    }

    /// Stops the vCPUs; the first one's report.
    fn finish(mut self) -> VcpuReport {
        self.vcpus.clear();
        let reports: Vec<VcpuReport> = self.threads.drain(..).map(|t| t.join().unwrap()).collect();
        for report in &reports {
            assert!(report.failure.is_none(), "{:?}", report.failure);
        }
        reports.into_iter().next().unwrap()
    }
}

fn plug_logging(memory: &MemoryManager, gpa: u64, size: u64) {
    let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, size).unwrap());
    let flags = SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    };
    memory
        .apply(|m| m.plug(Gpa(gpa), size, mapping.clone(), 0, flags))
        .unwrap();
}

fn dirty(memory: &MemoryManager, gpa: u64, size: u64) -> BTreeSet<u64> {
    match memory.dirty_pages(Gpa(gpa), size) {
        Ok(pages) => pages.into_iter().map(|Gfn(g)| g).collect(),
        Err(MemslotError::NotLogging { .. }) => BTreeSet::new(),
        Err(e) => panic!("dirty pages: {e}"),
    }
}

fn pages(start: u64, n: u64) -> std::ops::Range<u64> {
    start / P..start / P + n
}

#[test]
fn test_each_dirty_log_mode_reports_exactly_the_guest_written_pages() {
    if !kvm_or_skip("test_each_dirty_log_mode_reports_exactly_the_guest_written_pages") {
        return;
    }
    for mode in DirtyLogMode::ALL {
        let guest = Guest::new(mode.into());
        let memory = guest.memory().clone();
        assert_eq!(memory.dirty_log_mode(), mode);
        plug_logging(&memory, BASE, 2 * MIB);
        let all: BTreeSet<u64> = pages(BASE, 512).collect();
        let first = dirty(&memory, BASE, 2 * MIB);
        if mode == DirtyLogMode::Manual {
            assert_eq!(
                first, all,
                "initially set: the first report is the whole slot"
            );
        } else {
            assert!(first.is_empty(), "{mode}: {first:?}");
        }
        // Every third page, then one page twice, then nothing.
        let written: BTreeSet<u64> = pages(BASE, 512).step_by(3).collect();
        guest.must(Command::touch(
            GpaRange::new(Gpa(BASE), 2 * MIB).unwrap(),
            3 * P,
            true,
        ));
        assert_eq!(dirty(&memory, BASE, 2 * MIB), written, "{mode}");
        guest.write_pages([BASE / P + 7, BASE / P + 7]);
        assert_eq!(
            dirty(&memory, BASE, 2 * MIB),
            BTreeSet::from([BASE / P + 7]),
            "{mode}"
        );
        assert!(dirty(&memory, BASE, 2 * MIB).is_empty(), "{mode}");
        // A report of part of the range leaves the rest for later.
        guest.write_pages([BASE / P + 1, BASE / P + 300]);
        assert_eq!(dirty(&memory, BASE, 64 * P), BTreeSet::from([BASE / P + 1]));
        assert_eq!(
            dirty(&memory, BASE, 2 * MIB),
            BTreeSet::from([BASE / P + 300])
        );
        memory.check_consistency().unwrap();
        guest.finish();
    }
}

#[test]
fn test_a_full_dirty_ring_loses_no_write() {
    if !kvm_or_skip("test_a_full_dirty_ring_loses_no_write") {
        return;
    }
    // KVM's smallest ring: 4 KiB, 256 entries, some of them reserved.
    let guest = Guest::new(DirtyLogConfig {
        mode: DirtyLogMode::Ring,
        ring_bytes: 4096,
    });
    let memory = guest.memory().clone();
    plug_logging(&memory, BASE, 8 * MIB);
    guest.must(Command::touch(
        GpaRange::new(Gpa(BASE), 8 * MIB).unwrap(),
        P,
        true,
    ));
    let reported = dirty(&memory, BASE, 8 * MIB);
    assert_eq!(reported, pages(BASE, 2048).collect::<BTreeSet<_>>());
    assert_eq!(memory.unattributed_ring_entries(), 0);
    let report = guest.finish();
    let full = report.exits.get("dirty_ring_full").copied().unwrap_or(0);
    assert!(
        full >= 2048 / 256,
        "only {full} KVM_EXIT_DIRTY_RING_FULL exits"
    );
}

#[test]
fn test_ring_entries_survive_a_delete_and_the_reuse_of_the_slot_id() {
    if !kvm_or_skip("test_ring_entries_survive_a_delete_and_the_reuse_of_the_slot_id") {
        return;
    }
    let guest = Guest::new(DirtyLogMode::Ring.into());
    let memory = guest.memory().clone();
    plug_logging(&memory, BASE, MIB);
    let id = |gpa: u64| {
        memory
            .registered()
            .into_iter()
            .find(|s| s.gpa == Gpa(gpa))
            .unwrap()
            .id
    };
    let old_id = id(BASE);
    guest.write_pages([BASE / P + 2, BASE / P + 5]);
    // Delete, and plug elsewhere under the same id before any harvest.
    memory.apply(|m| m.unplug(Gpa(BASE), MIB)).unwrap();
    plug_logging(&memory, 2 * BASE, MIB);
    assert_eq!(id(2 * BASE), old_id, "the id is reused");
    guest.write_pages([2 * BASE / P + 5]);
    assert_eq!(
        dirty(&memory, BASE, MIB),
        BTreeSet::from([BASE / P + 2, BASE / P + 5])
    );
    assert_eq!(
        dirty(&memory, 2 * BASE, MIB),
        BTreeSet::from([2 * BASE / P + 5])
    );
    assert_eq!(memory.unattributed_ring_entries(), 0);
    guest.finish();
}

/// What the move/split run saw.
#[derive(Debug, Default)]
struct Tally {
    written: u64,
    lost: Vec<u64>,
    /// Pages reported twice in their round.
    duplicates: Vec<u64>,
    /// Of those, the ones whose guest store was not in flight during any
    /// memslot change.
    unexplained: Vec<u64>,
    /// Writes in flight during an op.
    overlapped: u64,
    ops: u64,
}

/// `vcpus` vCPUs, in parallel, write each page of a 1 MiB logging range
/// once per round (vCPU `i` the pages `i` modulo `vcpus`) while a writer
/// thread splits (protect ro / rw of a 64 KiB chunk), moves (away and back)
/// and reports dirty pages; at each round's end the writer pauses and a last
/// report is taken. Every page must be reported in the round it was written
/// in; returns what was lost or reported twice.
fn writes_across_moves_and_splits(
    mode: DirtyLogMode,
    rounds: u64,
    vcpus: u64,
) -> (Tally, Arc<MemoryManager>) {
    const SIZE: u64 = MIB;
    const CHUNK: u64 = 64 << 10;
    let guest = Guest::with_vcpus(mode.into(), vcpus);
    let memory = guest.memory().clone();
    plug_logging(&memory, BASE, SIZE);
    let parking = 3 * BASE;
    if mode == DirtyLogMode::Manual {
        dirty(&memory, BASE, SIZE); // the initially-set first pass
    }
    let reports: Arc<Mutex<Vec<BTreeSet<u64>>>> = Arc::default();
    // When each op ran (start, end): a store in flight across a delete and
    // re-create of its slot may fault once in each, and KVM logs both.
    let op_times: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    // Held by the writer for each op + report; the test takes it to pause it.
    let turn = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (memory, reports, turn, stop, op_times) = (
            memory.clone(),
            reports.clone(),
            turn.clone(),
            stop.clone(),
            op_times.clone(),
        );
        std::thread::spawn(move || {
            let mut ops = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let _turn = turn.lock().unwrap();
                let chunk = Gpa(BASE + (i * 5 % (SIZE / CHUNK)) * CHUNK);
                let op_start = Instant::now();
                if i % 3 == 2 {
                    memory
                        .apply(|m| m.move_range(Gpa(BASE), SIZE, Gpa(parking)))
                        .unwrap();
                    memory
                        .apply(|m| m.move_range(Gpa(parking), SIZE, Gpa(BASE)))
                        .unwrap();
                } else {
                    memory.apply(|m| m.protect(chunk, CHUNK, true)).unwrap();
                    memory.apply(|m| m.protect(chunk, CHUNK, false)).unwrap();
                }
                ops += 2;
                op_times.lock().unwrap().push((op_start, Instant::now()));
                reports.lock().unwrap().push(dirty(&memory, BASE, SIZE));
                drop(_turn);
                i += 1;
                // Room between ops, so most writes overlap none and the
                // duplicates check below has teeth.
                std::thread::sleep(Duration::from_millis(3));
            }
            ops
        })
    };
    let mut tally = Tally::default();
    let all: Vec<u64> = pages(BASE, SIZE / P).collect();
    for round in 0..rounds {
        let mut in_flight = std::collections::BTreeMap::new();
        let write_share = |vcpu: u64| {
            let mut mine = Vec::new();
            for &page in all.iter().filter(|&&p| p % vcpus == vcpu) {
                let issued = Instant::now();
                // A write refused while the page is away or read-only did
                // not happen: write it again until it lands.
                loop {
                    let write = Command::write(page * P + 8 * (round + 1), round);
                    match guest.run_on(vcpu as usize, write) {
                        CommandOutcome::Done { .. } => break,
                        CommandOutcome::Failed(
                            vmm::failure::GuestFailure::UnpluggedAccess { .. }
                            | vmm::failure::GuestFailure::ReadOnlyWrite { .. },
                        ) => std::thread::sleep(Duration::from_micros(100)),
                        CommandOutcome::Failed(f) => {
                            panic!("round {round} vCPU {vcpu} page {page:#x}: {f}")
                        }
                    }
                }
                mine.push((page, (issued, Instant::now())));
            }
            mine
        };
        let shares: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..vcpus)
                .map(|v| s.spawn(move || write_share(v)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (page, window) in shares.into_iter().flatten() {
            tally.written += 1;
            in_flight.insert(page, window);
        }
        let _pause = turn.lock().unwrap();
        let mut seen = BTreeSet::new();
        let mut round_reports = std::mem::take(&mut *reports.lock().unwrap());
        round_reports.push(dirty(&memory, BASE, SIZE));
        let ops = op_times.lock().unwrap().clone();
        let during_op =
            |(issued, done): (Instant, Instant)| ops.iter().any(|&(s, e)| s < done && issued < e);
        tally.overlapped += in_flight.values().filter(|w| during_op(**w)).count() as u64;
        for report in round_reports {
            for page in report {
                if !seen.insert(page) {
                    tally.duplicates.push(page);
                    if !during_op(in_flight[&page]) {
                        tally.unexplained.push(page);
                    }
                }
            }
        }
        tally.lost.extend(all.iter().filter(|p| !seen.contains(p)));
        assert!(
            seen.iter().all(|p| all.contains(p)),
            "a page outside the range"
        );
    }
    stop.store(true, Ordering::SeqCst);
    tally.ops = writer.join().unwrap();
    guest.finish();
    (tally, memory)
}

#[test]
fn test_ring_mode_reports_every_write_once_across_moves_and_splits() {
    if !kvm_or_skip("test_ring_mode_reports_every_write_once_across_moves_and_splits") {
        return;
    }
    let started = Instant::now();
    // Two vCPUs: two rings to harvest, written at once.
    let (tally, memory) = writes_across_moves_and_splits(DirtyLogMode::Ring, 6, 2);
    println!(
        "ring: {} writes ({} during an op), {} ops, lost {}, reported twice {} (all during an op: {}) in {:.1} s",
        tally.written,
        tally.overlapped,
        tally.ops,
        tally.lost.len(),
        tally.duplicates.len(),
        tally.unexplained.is_empty(),
        started.elapsed().as_secs_f64()
    );
    assert!(tally.ops >= 20, "the writer ran only {} ops", tally.ops);
    assert!(
        tally.overlapped < tally.written,
        "every write overlapped an op: the duplicates check is vacuous"
    );
    assert!(tally.lost.is_empty(), "lost {:x?}", tally.lost);
    // KVM may log one store twice when its slot is deleted and re-created
    // while the store faults (once per slot); any other repeat is ours.
    assert!(
        tally.unexplained.is_empty(),
        "reported twice {:x?}",
        tally.unexplained
    );
    assert_eq!(memory.unattributed_ring_entries(), 0);
}

#[test]
fn test_bitmap_modes_blind_window_across_moves_and_splits_is_measured() {
    if !kvm_or_skip("test_bitmap_modes_blind_window_across_moves_and_splits_is_measured") {
        return;
    }
    for mode in [DirtyLogMode::Bitmap, DirtyLogMode::Manual] {
        let (tally, memory) = writes_across_moves_and_splits(mode, 2, 1);
        let w = memory.teardown_windows();
        println!(
            "{mode}: {} writes ({} during an op), {} ops, lost {}, reported twice {}; {} blind windows, mean {:?}, max {:?}",
            tally.written,
            tally.overlapped,
            tally.ops,
            tally.lost.len(),
            tally.duplicates.len(),
            w.count,
            w.total / w.count.max(1) as u32,
            w.max
        );
        assert!(tally.ops >= 20 && w.count > 0, "{mode}: {tally:?} {w:?}");
        assert!(tally.overlapped < tally.written, "{mode}: {tally:?}");
        // A write is lost only inside a window, and a single vCPU writing one
        // page per command exit lands at most one write in each.
        assert!(tally.lost.len() as u64 <= w.count, "{mode}: {tally:?}");
        if mode == DirtyLogMode::Bitmap {
            assert!(tally.unexplained.is_empty(), "{mode}: {tally:?}");
        }
    }
}

fn vmm_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(args)
        .output()
        .expect("vmm-cli runs")
}

#[test]
fn test_cli_refuses_a_dirty_log_mode_the_host_cannot_give_with_the_reason() {
    let out = vmm_cli(&["run", "--dirty-log", "rings"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bitmap, manual, ring"), "{err}");
    if !kvm_or_skip("test_cli_refuses_a_dirty_log_mode_the_host_cannot_give_with_the_reason") {
        return;
    }
    // KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) gives the largest
    // ring; one past it, or one not a power of two, is refused before any VM.
    for size in ["64M", "12K"] {
        let started = Instant::now();
        let out = vmm_cli(&["run", "--dirty-log", "ring", "--dirty-ring-size", size]);
        assert_eq!(out.status.code(), Some(2), "{size}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--dirty-log ring: this host's KVM cannot"),
            "{err}"
        );
        assert!(
            err.contains("maximum") || err.contains("power of two"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn test_scenario_header_picks_the_mode_and_the_json_report_names_it() {
    if !kvm_or_skip("test_scenario_header_picks_the_mode_and_the_json_report_names_it") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, first) in [("bitmap", 0), ("manual", 512), ("ring", 0)] {
        let path = dir.join(format!("{mode}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
vcpus = 1
mem = "16M"
dirty_log = "{mode}"
[[step]]
do = "plug"
gpa = 0x100000000
size = 0x200000
flags = ["dirty-log"]
[[step]]
do = "dirty-pages"
gpa = 0x100000000
size = 0x200000
pages = {first}
[[step]]
do = "touch"
gpa = 0x100000000
size = 0x200000
stride = 0x2000
write = true
[[step]]
do = "dirty-pages"
gpa = 0x100000000
size = 0x200000
pages = 256
"#
            ),
        )
        .unwrap();
        let out = vmm_cli(&["run", "--json", "--scenario", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["dirty_log"], mode);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_device_dirty_bits_merge_into_every_mode() {
    if !kvm_or_skip("test_device_dirty_bits_merge_into_every_mode") {
        return;
    }
    for mode in DirtyLogMode::ALL {
        let initial = if mode == DirtyLogMode::Manual { 512 } else { 0 };
        let text = format!(
            r#"
            [[step]]
            do = "plug"
            gpa = "0x1_0000_0000"
            size = "2M"
            flags = ["dirty-log"]
            [[step]]
            do = "dirty-pages"
            gpa = "0x1_0000_0000"
            size = "2M"
            pages = {initial}
            [[step]]
            do = "dma-fill"
            gpa = "0x1_0000_2000"
            size = "8K"
            value = 5
            [[step]]
            do = "write"
            gpa = "0x1_0010_0000"
            value = 7
            [[step]]
            do = "dirty-pages"
            gpa = "0x1_0000_0000"
            size = "2M"
            pages = 3
            [[step]]
            do = "dirty-pages"
            gpa = "0x1_0000_0000"
            size = "2M"
            pages = 0
        "#
        );
        let scenario = vmm::scenario::Scenario::parse(&text).expect("valid scenario");
        let cfg = vmm::run::RunConfig {
            scenario: Some(Arc::new(scenario)),
            dirty_log: mode,
            ..vmm_tests::config("default", 16 << 20, 1)
        };
        let (report, console) = vmm_tests::run(&cfg);
        assert!(report.succeeded(), "{mode}: {:?}\n{console}", report.error);
        assert_eq!(report.dirty_log, mode);
        let steps = &report.scenario.as_ref().unwrap().steps;
        assert!(
            steps[4]
                .actual
                .contains("1 in KVM's log, 2 written by devices"),
            "{mode}: {}",
            steps[4].actual
        );
    }
}

#[test]
fn test_scenario_header_with_an_unknown_mode_is_refused_naming_the_key() {
    let err = vmm::scenario::Scenario::parse("dirty_log = \"rings\"\n[[step]]\ndo = \"check\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dirty_log") && err.contains("bitmap, manual, ring"),
        "{err}"
    );
}
