//! A software stage-2 table in x86 EPT format, walked without locks.
//!
//! Devices of the VMM (the DMA engine) translate guest-physical addresses
//! through a [`Stage2Table`], the way an IOMMU walks a second-level table that
//! shares the EPT format. A leaf maps a page of guest-physical space to the
//! page-aligned host-virtual address ([`Hva`]) of guest
//! memory, stored in the EPT frame field.
//!
//! # Parts
//! - [`entry`]: the EPT bit layout, [`Entry`] encode/decode, index math.
//! - `slot`: the atomic protocol on one entry (one load per read, installs by
//!   compare-and-swap, freeze/unfreeze) — the part the loom model checks.
//! - `reclaim`: table pages and their epoch-based reclamation and poisoning.
//! - `table`: [`Stage2Table`], `map` and the lock-free walk (`translate`).
//! - `edit`: the range operations `unmap`, `protect`, `take_dirty`, and
//!   `split`/`collapse` of huge leaves.
//! - `dump`: [`MappedRun`]s for reports.
//!
//! # Invariants
//! 1. Every entry is read with exactly one atomic load (`Acquire`); a walker
//!    decides from that one value and never re-reads a slot to complete it.
//! 2. A table page is fully initialized before it is linked: the installer
//!    fills it, then publishes it with a `Release` compare-and-swap, so a
//!    walker that sees the pointer sees the initialized page.
//! 3. Installs compare-and-swap from the value they saw (empty for a new leaf
//!    or table). A loser frees its unpublished page and re-reads.
//! 4. A zap freezes the entry ([`FROZEN`]), tears down what it pointed at
//!    (freezing each entry of a lower table in turn, but for cache lines of
//!    empty entries: under the zap's exclusive lock no install can fill
//!    one), then clears it. Only the
//!    writer that froze an entry changes it; installers fail their CAS on it;
//!    walkers that meet it restart from the root after a short back-off.
//!    A leaf has nothing below it to tear down, so it is cleared by one CAS
//!    from the value read (which fails, and is retried, if a walker set A/D).
//! 5. Memory that stays mapped never shows a hole: a split publishes a fully
//!    populated lower table in the CAS that replaces the huge leaf, and a
//!    collapse freezes the lower leaves (walkers wait) and replaces the table
//!    pointer by the huge leaf in one CAS.
//! 6. A page is freed only after an epoch grace period: walkers stay pinned
//!    for the whole walk and writers retire pages after unlinking them.
//! 7. Tables are never left empty: an `unmap` that empties a lower table
//!    unlinks it, so a later huge `map` over that range succeeds.
//!
//! # Lock order and concurrency
//! Walkers ([`Stage2Table::translate`], [`Stage2Table::lookup`]) take no
//! lock. Writers hold the table's writer lock, an `RwLock<()>` that is the
//! innermost lock of `mm`: `map` takes it shared, so concurrent maps (device
//! faults) install lock-free against one another, racing by CAS; the range
//! operations and `dump` take it exclusive, so a range operation sees no
//! concurrent install and can prune empty tables. Walkers still race with
//! every writer: they only ever change Accessed/Dirty of a leaf by CAS, which
//! writers tolerate by re-reading and retrying.

pub mod entry;

mod dump;
mod edit;
mod reclaim;
mod slot;
mod table;

#[cfg(all(test, vmm_loom))]
mod loom_tests;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod proptests;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod stress_tests;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests;

use crate::mm::addr::{Gpa, GpaRange, Hva};

pub use dump::MappedRun;
pub use entry::{Access, Decoded, Entry, Leaf, PageSize, Perms, FROZEN};
pub use reclaim::ReclaimStats;
pub use table::{Stage2Table, Translation};

/// Errors of the stage-2 table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stage2Error {
    /// The guest-physical address is not a multiple of the page size.
    #[error("gpa {gpa} is not aligned to a {size} page")]
    MisalignedGpa {
        /// The address given.
        gpa: Gpa,
        /// The page size asked for.
        size: PageSize,
    },
    /// The host-virtual address is not a multiple of the page size.
    #[error("hva {hva} is not aligned to a {size} page")]
    MisalignedHva {
        /// The address given.
        hva: Hva,
        /// The page size asked for.
        size: PageSize,
    },
    /// The page would reach past the 48-bit guest-physical space.
    #[error("gpa {gpa} + {size} is beyond the 48-bit guest-physical space")]
    GpaOutOfRange {
        /// The address given.
        gpa: Gpa,
        /// The page size asked for.
        size: PageSize,
    },
    /// The host page does not fit the 52-bit EPT frame field.
    #[error("hva {hva} does not fit the 52-bit EPT frame field")]
    HvaOutOfRange {
        /// The address given.
        hva: Hva,
    },
    /// The permissions are empty or write-without-read.
    #[error("permissions {perms} cannot be mapped (empty, or write without read)")]
    InvalidPerms {
        /// The permissions given.
        perms: Perms,
    },
    /// Part of the page is already mapped.
    #[error("gpa {gpa} ({size} page) overlaps an existing mapping")]
    AlreadyMapped {
        /// The address given.
        gpa: Gpa,
        /// The page size asked for.
        size: PageSize,
    },
    /// A range that is not made of whole 4 KiB pages, or reaches past the
    /// guest-physical space.
    #[error("range {range} is not 4 KiB aligned or is beyond the 48-bit guest-physical space")]
    BadRange {
        /// The range given.
        range: GpaRange,
    },
    /// Nothing is mapped at the address.
    #[error("gpa {gpa} is not mapped")]
    NotMapped {
        /// The address given.
        gpa: Gpa,
    },
    /// `split` of an address mapped by a 4 KiB leaf.
    #[error("gpa {gpa} is mapped by a 4K leaf, which cannot be split")]
    NotHuge {
        /// The address given.
        gpa: Gpa,
    },
    /// `collapse` found a lower table it cannot turn into one leaf.
    #[error("cannot collapse the {size} region at gpa {gpa}: {reason}")]
    NotCollapsible {
        /// The region's first address.
        gpa: Gpa,
        /// The leaf size asked for.
        size: PageSize,
        /// Why.
        reason: &'static str,
    },
    /// The allocator returned a table page whose address does not fit a frame
    /// field (only possible with 5-level host paging).
    #[error("table page at {addr:#x} does not fit the 52-bit EPT frame field")]
    TablePageUnaddressable {
        /// The page's address.
        addr: u64,
    },
}
