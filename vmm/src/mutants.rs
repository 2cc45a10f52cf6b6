//! Deliberately planted bugs, to prove `vmm fuzz` finds the kind of bug it
//! exists for. Built only with the cargo feature `mutants`, chosen at run
//! time with `VMM_MUTANT=NAME` (one at a time); without the feature [`on`]
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
        assert_eq!(super::ALL.len(), 8);
    }
}
