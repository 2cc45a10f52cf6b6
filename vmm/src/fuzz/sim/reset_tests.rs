//! A reset VM ([`SimVm::reset`]) runs a timeline exactly as a new one:
//! every committed libFuzzer input, run on one VM reset after each input
//! before it, gives the same outcome and detail at every step, and the same
//! finding, as on a new VM; and a reset that cannot reach the boot state
//! says so.

use super::*;
use crate::fuzz::bytes;

/// Each step's outcome and detail, and the finding.
type Trace = (Vec<(Outcome, String)>, Option<String>);

/// `detail` without host addresses (`hva 0x...`, `host 0x...`), which
/// differ between any two VMs, new or reset.
fn without_host_addresses(detail: &str) -> String {
    let mut out = String::new();
    let mut rest = detail;
    while let Some(at) = ["hva 0x", "host 0x"]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
        .min()
    {
        let (i, len) = at;
        out.push_str(&rest[..i + len]);
        rest = rest[i + len..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
    }
    out.push_str(rest);
    out
}

fn traced(vm: &mut SimVm, actions: &[Action], faults: &[(usize, usize)]) -> Trace {
    let options = SimOptions {
        faults,
        guard_reader: false,
        locked_pages: false,
        ..Default::default()
    };
    let mut steps = Vec::new();
    let found = run_on(vm, actions, &options, &mut |o, d| {
        steps.push((o, without_host_addresses(d)))
    });
    (
        steps,
        found.map(|f| without_host_addresses(&format!("{f:?}"))),
    )
}

/// What a timeline left behind for the reset to undo.
#[derive(Default, Debug)]
struct Leftovers {
    pins: usize,
    logging: usize,
    plugged: usize,
    read_only: usize,
    rolled_back: usize,
}

#[test]
fn test_a_reset_vm_runs_every_corpus_input_as_a_new_vm_does() {
    let layout = bytes::layout();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/memslots");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut vm = SimVm::new(&layout).unwrap();
    let mut left = Leftovers::default();
    let (mut resets, mut rebuilds) = (0, 0);
    for path in &paths {
        let (actions, faults) = bytes::decode(&std::fs::read(path).unwrap());
        // The new VM first, and dropped before the reused one runs: a step
        // may map a mapping of tens of TiB, which succeeds only if no other
        // VM holds one.
        let fresh = traced(&mut SimVm::new(&layout).unwrap(), &actions, &faults);
        let reused = traced(&mut vm, &actions, &faults);
        assert_eq!(reused, fresh, "{}", path.display());

        let map = vm.memory.load();
        let ram = GpaRange::new(Gpa(layout.ram.0), layout.ram.1).unwrap();
        let boot_state = map.len() == 2 && map.iter().any(|s| s.range() == ram);
        left.pins += usize::from(!vm.held.is_empty());
        left.logging += usize::from(map.iter().any(|s| s.flags().dirty_log));
        left.plugged += usize::from(!boot_state);
        left.read_only += usize::from(map.iter().any(|s| s.flags().read_only));
        left.rolled_back += usize::from(reused.0.iter().any(|(o, _)| *o == Outcome::KvmRolledBack));
        if reused.1.is_none() && vm.reset() {
            resets += 1;
        } else {
            vm = SimVm::new(&layout).unwrap();
            rebuilds += 1;
        }
    }
    // The corpus exercises every kind of state a reset must undo (but
    // pending dirty pages: it has no guest writes; see the next test).
    let kinds = [
        left.pins,
        left.logging,
        left.plugged,
        left.read_only,
        left.rolled_back,
    ];
    assert!(kinds.iter().all(|&n| n > 0), "{left:?}");
    assert!(
        resets > 10 * rebuilds,
        "{resets} resets, {rebuilds} rebuilds"
    );
}

/// A VM with a fixed slot beyond its boot region (which no op can unplug)
/// is not back at its boot state after a reset: the reset says so, and
/// [`run_reusing`] then builds anew.
#[test]
fn test_a_reset_that_cannot_reach_the_boot_state_fails() {
    let layout = bytes::layout();
    let mut vm = SimVm::new(&layout).unwrap();
    assert!(vm.reset(), "a new VM resets");
    let at = layout.ram.0 + layout.ram.1;
    let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, PAGE).unwrap());
    let fixed = SlotFlags {
        fixed: true,
        ..SlotFlags::NONE
    };
    vm.memory
        .apply(|m| m.plug(Gpa(at), PAGE, mapping, 0, fixed))
        .unwrap();
    assert!(!vm.reset());
}

/// A pending dirty page of an unplugged logging slot would be reported by
/// the next timeline's `dirty-pages` over the same range: the reset drops it.
#[test]
fn test_a_reset_drops_the_dirty_pages_of_unplugged_slots() {
    let layout = bytes::layout();
    let mut vm = SimVm::new(&layout).unwrap();
    let (ram, _) = layout.ram;
    vm.memory
        .apply(|m| m.set_dirty_log(Gpa(ram), PAGE, true))
        .unwrap();
    assert!(vm.kvm.guest_write(Gpa(ram)));
    assert_eq!(vm.kvm.dirty_backlog(), 1, "KVM logged the page");
    vm.memory.apply(|m| m.unplug(Gpa(ram), PAGE)).unwrap();
    assert_eq!(vm.kvm.dirty_backlog(), 0, "the delete freed the log");
    assert_eq!(
        vm.memory.dirty_backlog(),
        1,
        "the unplug harvested the page"
    );
    assert!(vm.reset());
    assert_eq!(vm.memory.dirty_backlog(), 0);
    assert!(
        vm.memory.dirty_pages(Gpa(ram), PAGE).is_err(),
        "nothing logs or is pending"
    );
}

/// A DMA transfer's writes set Dirty bits in the IOMMU, which the reset's
/// unplug harvests into its pending set: the reset drops them, or the next
/// timeline's `dirty-pages` over the same range would report them.
#[test]
fn test_a_reset_drops_the_frames_devices_wrote() {
    use crate::scenario::num::Num;
    use crate::scenario::step::{self, Guest};
    let layout = bytes::layout();
    let mut vm = SimVm::new(&layout).unwrap();
    let at = 0x1_0000_0000;
    let plug = Action::Plug(step::Plug {
        gpa: Num(at),
        size: Num(PAGE),
        backing: None,
        flags: None,
    });
    let fill = Action::DmaFill(Guest {
        vcpu: 0,
        repeat: 1,
        is_async: false,
        command: step::DmaFill {
            gpa: Num(at),
            size: Num(PAGE),
            value: Num(7),
        },
    });
    assert_eq!(traced(&mut vm, &[plug, fill], &[]).1, None);
    assert!(vm.reset());
    let range = GpaRange::new(Gpa(at), PAGE).unwrap();
    assert_eq!(vm.iommu.take_dirty(range).unwrap(), []);
}
