//! `vmm bench memslots` flags, checked before any VM exists, and the
//! module's error type.

use std::time::Duration;

use clap::Args;
use guest_image::protocol::layout;

use crate::units::parse_duration;

/// Memslots every bench VM holds besides the test area: the boot region,
/// guest RAM (page tables, result buffers) and the bench's 2 MiB test range.
pub const BASE_SLOTS: u64 = 3;

/// The six measurements of KVM's `memslot_perf_test`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, strum::Display, serde::Serialize,
)]
#[strum(serialize_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    /// The guest writes every page of 32 MiB after the host discarded it
    /// (every write faults the page in through a memslot).
    Map,
    /// The host discards 128 MiB one 4 KiB page at a time.
    Unmap,
    /// The host discards 128 MiB in 2 MiB chunks (cut at slot boundaries).
    UnmapChunked,
    /// The last slot, half of the area the guest writes, moves away and back.
    MoveActive,
    /// The last slot, beside the area the guest writes, moves away and back.
    MoveInactive,
    /// The guest writes every page of 512 MiB, the host reads each back and
    /// writes it.
    Rw,
}

impl Test {
    /// Every test, in KVM's order.
    pub const ALL: [Test; 6] = [
        Test::Map,
        Test::Unmap,
        Test::UnmapChunked,
        Test::MoveActive,
        Test::MoveInactive,
        Test::Rw,
    ];

    /// Pages of the test area (KVM's sizes, without its sync page).
    pub fn area_pages(self) -> u64 {
        match self {
            Test::Map => (32 << 20) / 4096,
            Test::Unmap | Test::UnmapChunked => (128 << 20) / 4096,
            Test::MoveActive | Test::MoveInactive | Test::Rw => (512 << 20) / 4096,
        }
    }
}

/// Errors of `vmm bench memslots`.
#[derive(Debug, thiserror::Error)]
pub enum MemslotsError {
    /// A slot count outside what the bench and KVM allow.
    #[error("--slots {slots}: each count must be at least {min} (the bench VM's {base} own slots and 2 for the test area) and at most KVM_CAP_NR_MEMSLOTS{limit}", min = BASE_SLOTS + 2, base = BASE_SLOTS, limit = max.map_or(String::new(), |m| format!(" ({m})")))]
    Slots {
        /// The count asked for.
        slots: u64,
        /// KVM's limit (`None` when unknown at parse time).
        max: Option<u64>,
    },
    /// The tests list is empty.
    #[error(
        "--tests: name at least one of map, unmap, unmap-chunked, move-active, move-inactive, rw"
    )]
    NoTests,
    /// `--stress-size` is not whole pages.
    #[error("--stress-size {0:#x} must be a non-zero multiple of 4 KiB")]
    StressSize(u64),
    /// `--time` is zero.
    #[error("--time must be more than 0")]
    ZeroTime,
    /// The bench VM or its guest failed.
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    /// An op of the memory manager failed.
    #[error("{what}: {source}")]
    Memory {
        /// The op.
        what: String,
        /// The manager's error.
        source: crate::mm::manager::MemslotError,
    },
    /// A raw KVM ioctl or host call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: String,
        /// The errno.
        source: std::io::Error,
    },
    /// Guarded host access failed.
    #[error("{what}: {source}")]
    Guard {
        /// The access.
        what: String,
        /// The guard's error.
        source: crate::mm::guard::GuardError,
    },
    /// A value read back is not what was written.
    #[error("{0}")]
    Mismatch(String),
    /// Host memory could not be mapped.
    #[error(transparent)]
    Backing(#[from] crate::mm::backing::BackingError),
}

/// `vmm bench memslots` flags.
#[derive(Debug, Clone, Args)]
// A deferred subcommand's help opens with this, not the listing's line.
#[command(
    about = "Memslot ops at 509 to 32,764 slots under a running guest (KVM's memslot_perf_test) vs raw ioctls"
)]
pub struct MemslotsArgs {
    /// Memslots in the VM, counting its 3 own (KVM's -s cap), comma-separated (e.g. 509,8194,32764).
    #[arg(
        long,
        value_name = "N,...",
        value_delimiter = ',',
        default_value = "509"
    )]
    pub slots: Vec<u64>,
    /// Tests to run, comma-separated: map, unmap, unmap-chunked, move-active, move-inactive, rw (default all).
    #[arg(long, value_name = "TEST,...", value_delimiter = ',', value_enum)]
    pub tests: Vec<Test>,
    /// Time each implementation runs a test per round (iterations until then, at least 2).
    #[arg(long, value_name = "DURATION", default_value = "300ms", value_parser = parse_duration)]
    pub time: Duration,
    /// Rounds per test and slot count, alternating whether ours or raw goes first.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,
    /// vCPUs running the guest (the area's pages are split among them).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=layout::MAX_VCPUS))]
    pub vcpus: u64,
    /// Run the modification-stress mode instead: add and delete a slot in a loop while vCPUs dirty memory.
    #[arg(long)]
    pub stress: bool,
    /// Guest memory each vCPU dirties in the stress mode.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::units::parse_size, requires = "stress")]
    pub stress_size: u64,
    /// How the raw loop moves a slot: kvm-move (one KVM_SET_USER_MEMORY_REGION with the new address, KVM_MR_MOVE, as KVM's test) or delete-create (two calls, as the memory manager issues).
    #[arg(long, value_enum, default_value = "kvm-move")]
    pub raw_move: RawMove,
    /// What a memslot move or delete invalidates in KVM's page tables, in both implementations' VMs: slot (only that slot's translations) or all (every translation, KVM's default-VM quirk).
    #[arg(long, value_name = "ZAP", value_enum, default_value_t = crate::kvm::zap::MemslotZap::Slot)]
    pub memslot_zap: crate::kvm::zap::MemslotZap,
    /// A JSON report on stdout (the tables move to stderr).
    #[arg(long)]
    pub json: bool,
}

/// How the raw loop moves a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, strum::Display, serde::Serialize)]
#[strum(serialize_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub enum RawMove {
    /// One call with the new guest-physical address (KVM_MR_MOVE).
    KvmMove,
    /// A delete, then a create at the new address.
    DeleteCreate,
}

impl MemslotsArgs {
    /// The tests to run (all when none named).
    pub fn tests(&self) -> Vec<Test> {
        if self.tests.is_empty() {
            Test::ALL.to_vec()
        } else {
            self.tests.clone()
        }
    }

    /// Checks what can be checked without KVM; `max_slots` (KVM's limit)
    /// is checked by [`check_slots`](Self::check_slots).
    ///
    /// # Errors
    /// [`MemslotsError::Slots`], [`MemslotsError::ZeroTime`].
    pub fn validate(&self) -> Result<(), MemslotsError> {
        self.check_slots(u64::from(u32::MAX))?;
        if self.time.is_zero() {
            return Err(MemslotsError::ZeroTime);
        }
        if self.stress && (self.stress_size < 4096 || self.stress_size % 4096 != 0) {
            return Err(MemslotsError::StressSize(self.stress_size));
        }
        Ok(())
    }

    /// Every slot count within `[BASE_SLOTS + 2, max_slots]`.
    ///
    /// # Errors
    /// [`MemslotsError::Slots`] naming the first count outside.
    pub fn check_slots(&self, max_slots: u64) -> Result<(), MemslotsError> {
        match self
            .slots
            .iter()
            .find(|&&n| n < BASE_SLOTS + 2 || n > max_slots)
        {
            Some(&slots) => Err(MemslotsError::Slots {
                slots,
                max: (max_slots != u64::from(u32::MAX)).then_some(max_slots),
            }),
            None if self.slots.is_empty() => Err(MemslotsError::Slots {
                slots: 0,
                max: None,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MemslotsArgs,
    }

    fn parse(a: &[&str]) -> Result<MemslotsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(a.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn test_defaults_are_all_tests_at_509_slots() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.slots, vec![509]);
        assert_eq!(a.tests(), Test::ALL.to_vec());
        a.validate().unwrap();
    }

    #[test]
    fn test_bad_values_are_refused_with_the_flag_named() {
        assert!(parse(&["--tests", "map,nonesuch"]).is_err());
        let a = parse(&["--slots", "509,4"]).unwrap();
        let e = a.validate().unwrap_err().to_string();
        assert!(e.contains("--slots 4"), "{e}");
        let a = parse(&["--slots", "40000"]).unwrap();
        assert!(a
            .check_slots(32764)
            .unwrap_err()
            .to_string()
            .contains("32764"));
        assert!(parse(&["--time", "0s"]).map_or(true, |a| a.validate().is_err()));
        assert!(parse(&["--vcpus", "0"]).is_err());
    }

    #[test]
    fn test_slot_count_message_names_no_placeholder_limit() {
        let e = parse(&["--slots", "2"]).unwrap().validate().unwrap_err();
        let e = e.to_string();
        assert!(e.ends_with("at most KVM_CAP_NR_MEMSLOTS"), "{e}");
        assert!(!e.contains("(0)"), "{e}");
    }

    #[test]
    fn test_stress_size_without_stress_is_refused() {
        let e = parse(&["--stress-size", "1M"]).expect_err("refused");
        assert!(e.to_string().contains("--stress"), "{e}");
        assert!(parse(&["--stress", "--stress-size", "1M"]).is_ok());
    }
}
