//! Deliberately planted bugs, to prove `vmm fuzz` finds the kind of bug it
//! exists for. Built only with the cargo feature `mutants`, chosen at run
//! time with `VMM_MUTANT=NAME` (one at a time), each an [`on`] check at the
//! real code point; without the feature [`on`]
//! is a constant `false` the compiler removes, so normal builds carry none.
//! `scripts/fuzz-mutants.sh` runs the fuzzer against each and prints a table.

/// Every mutant: its name, the part of the code it breaks, and the bug.
pub const ALL: &[(&str, &str, &str)] = &[
    (
        "veto-ignored",
        "devices::pins",
        "a non-revocable pin does not veto an op that takes its memory",
    ),
    (
        "resize-first-slot",
        "mm::slot_map::ops",
        "resize acts on the first slot of a mapping only, not the whole mapping",
    ),
    (
        "thp-cut-2m",
        "mm::backing",
        "THP memory is cut at 2 MiB, not 4 KiB",
    ),
    (
        "dirty-pages-silent",
        "mm::manager",
        "dirty-pages over a range no slot logs reports nothing instead of refusing",
    ),
    (
        "duplicate-pin-ok",
        "scenario::driver (and the simulated tier's copy of its pin step)",
        "a second pin under a held name replaces the first",
    ),
    (
        "id-reused-live",
        "mm::slot_map::ids",
        "a slot id is handed out again while its slot is still live",
    ),
    (
        "no-merge",
        "mm::slot_map::slot",
        "adjacent pieces of one mapping never merge back into one slot",
    ),
    (
        "unplug-keeps-last-page",
        "mm::slot_map::ops",
        "unplug leaves the last page of the range plugged",
    ),
    (
        "dirty-harvest-dropped",
        "mm::manager (memslot changes)",
        "a dirty-logging slot is deleted without harvesting its dirty log first",
    ),
    (
        "rollback-unplugs",
        "mm::notifier::hub",
        "an unplug rolled back after a failed memslot call still leaves the hub's plugged set",
    ),
    (
        "plug-many-partial",
        "scenario::ops",
        "plug-many applies its slots one op each, so a refused batch leaves its first slots plugged",
    ),
    (
        "id-freed-before-delete",
        "mm::manager::mirror",
        "the mirror records a memslot change before KVM confirmed it, so a failed delete frees an id KVM still holds",
    ),
    (
        "replug-not-zeroed",
        "mm::manager (host teardown)",
        "host memory an op took away is not discarded, so a later grow over it shows the old contents",
    ),
    (
        "munlock-shared",
        "devices::pins (lock counts)",
        "releasing one pin munlocks pages another live pin still holds locked",
    ),
    (
        "iommu-protect-keeps-leaves",
        "devices::iommu",
        "a protect to read-only does not zap the range's IOMMU leaves, so devices keep writable leaves in read-only memory",
    ),
    (
        "teardown-leaks-mappings",
        "mm::manager (teardown)",
        "dropping the manager deletes every memslot but leaks the host mappings (and memfd and file descriptors) behind them",
    ),
    (
        "drain-skipped",
        "mm::guard (writer side)",
        "an op does not wait for the guards inside the slots it deletes",
    ),
];

/// Whether the mutant `name` is planted in this run.
#[cfg(feature = "mutants")]
pub fn on(name: &str) -> bool {
    use std::sync::OnceLock;
    static ACTIVE: OnceLock<Option<String>> = OnceLock::new();
    ACTIVE
        .get_or_init(|| std::env::var("VMM_MUTANT").ok())
        .as_deref()
        == Some(name)
}

/// Whether the mutant `name` is planted in this run: never without the
/// `mutants` feature.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub fn on(_name: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_no_mutant_without_the_feature_or_the_variable() {
        if cfg!(feature = "mutants") && std::env::var_os("VMM_MUTANT").is_some() {
            return;
        }
        for (name, _, _) in super::ALL {
            assert!(!super::on(name), "{name}");
        }
        let mut names: Vec<&str> = super::ALL.iter().map(|m| m.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::ALL.len(), "mutant names are unique");
        assert!(names.len() >= 15);
    }
}
