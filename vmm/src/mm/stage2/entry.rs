//! The EPT entry format, page sizes, permissions and index math.
//!
//! An [`Entry`] is one 64-bit word laid out as an Intel EPT paging-structure
//! entry (SDM Vol. 3C, "EPT Translation Mechanism"):
//!
//! | bits  | meaning                                                     |
//! |-------|-------------------------------------------------------------|
//! | 0     | read ([`READ`])                                             |
//! | 1     | write ([`WRITE`])                                           |
//! | 2     | execute ([`EXEC`])                                          |
//! | 3..5  | memory type of a leaf ([`MEMTYPE_MASK`], write-back = 6)    |
//! | 6     | ignore PAT ([`IGNORE_PAT`])                                 |
//! | 7     | large page: a leaf at level 2 or 3 ([`LARGE`])              |
//! | 8     | accessed ([`ACCESSED`])                                     |
//! | 9     | dirty, leaves only ([`DIRTY`])                              |
//! | 12..51| frame: `address >> 12` ([`FRAME_MASK`])                     |
//! | 62    | software-available: frozen ([`FROZEN_BIT`])                 |
//!
//! The frame of a leaf holds a page-aligned host-virtual address of guest
//! memory; the frame of a table entry holds the host-virtual address of the
//! lower table page (this is a software table: devices walk it, not the CPU).
//!
//! A *frozen* entry is exactly [`FROZEN`]: the frozen bit with read, write and
//! execute clear, so it is never a present entry. Writers park an entry in
//! that state while they tear down what it pointed at; nobody but the writer
//! that froze an entry may change it (installers compare-and-swap from empty,
//! which fails on a frozen entry).
//!
//! Levels are numbered as the SDM does: 4 is the root (PML4), 3 holds 1 GiB
//! leaves, 2 holds 2 MiB leaves, 1 holds 4 KiB leaves. Each level translates
//! 9 bits of the 48-bit guest-physical address.

use std::fmt;

use crate::mm::addr::{Gpa, Hva, HUGE_1G, HUGE_2M, PAGE_SHIFT, PAGE_SIZE};

/// Read access allowed.
pub const READ: u64 = 1 << 0;
/// Write access allowed.
pub const WRITE: u64 = 1 << 1;
/// Instruction fetch allowed.
pub const EXEC: u64 = 1 << 2;
/// The three permission bits.
pub const PERM_MASK: u64 = READ | WRITE | EXEC;
/// First bit of the EPT memory-type field.
pub const MEMTYPE_SHIFT: u32 = 3;
/// The EPT memory-type field (bits 3..5).
pub const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
/// The write-back memory type, the only one this table writes.
pub const MEMTYPE_WB: u64 = 6;
/// Ignore the guest PAT for this leaf.
pub const IGNORE_PAT: u64 = 1 << 6;
/// The entry at level 2 or 3 is a huge leaf, not a table pointer.
pub const LARGE: u64 = 1 << 7;
/// Set by a walker when it translates through a leaf.
pub const ACCESSED: u64 = 1 << 8;
/// Set by a walker when it translates a write through a leaf.
pub const DIRTY: u64 = 1 << 9;
/// The frame field (bits 12..51).
pub const FRAME_MASK: u64 = ((1 << 52) - 1) & !(PAGE_SIZE - 1);
/// Software-available bit 62: the entry is frozen by a writer.
pub const FROZEN_BIT: u64 = 1 << 62;
/// The one frozen value: not present (no permission bit), frozen bit set.
pub const FROZEN: u64 = FROZEN_BIT;
/// Bits this table never sets in a live entry (52..61 and 63). A walker that
/// reads an entry with any of them set has read something that is not an
/// entry: a freed, poisoned page (see [`POISON`]).
pub const RESERVED_MASK: u64 = !(FRAME_MASK | FROZEN_BIT | 0x3ff);
/// The value every entry of a table page is overwritten with when the page is
/// reclaimed (test and debug builds). It has reserved bits set, so it decodes
/// as [`Decoded::Corrupt`] and a walker that reads it panics.
pub const POISON: u64 = 0x3ff5_a5a5_a5a5_a5a5;
/// Entries per table page.
pub const ENTRIES: usize = 512;
/// The root level.
pub const ROOT_LEVEL: u8 = 4;
/// Width of the guest-physical address space a 4-level table translates.
pub const GPA_BITS: u32 = 48;
/// One past the highest guest-physical address the table can map.
pub const GPA_LIMIT: u64 = 1 << GPA_BITS;
/// One past the highest address the frame field can hold.
pub const FRAME_LIMIT: u64 = 1 << 52;

/// The bytes one entry at `level` (1..=4) covers: 4 KiB, 2 MiB, 1 GiB, 512 GiB.
pub const fn level_size(level: u8) -> u64 {
    1 << (PAGE_SHIFT + 9 * (level as u32 - 1))
}

/// The index of the entry translating `gpa` in a table at `level` (1..=4).
pub const fn level_index(gpa: u64, level: u8) -> usize {
    ((gpa >> (PAGE_SHIFT + 9 * (level as u32 - 1))) & (ENTRIES as u64 - 1)) as usize
}

/// The size of a leaf.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// A 4 KiB leaf at level 1.
    Size4K,
    /// A 2 MiB leaf at level 2.
    Size2M,
    /// A 1 GiB leaf at level 3.
    Size1G,
}

impl PageSize {
    /// Bytes in one page of this size.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => HUGE_2M,
            PageSize::Size1G => HUGE_1G,
        }
    }
    /// The table level whose entries are leaves of this size.
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The leaf size held at `level`, or `None` above level 3.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
    /// A short name: `4K`, `2M` or `1G`.
    pub const fn name(self) -> &'static str {
        match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The permissions of a leaf: a subset of read, write and execute.
///
/// ```
/// use vmm::mm::stage2::{Access, Perms};
/// assert!(Perms::RW.allows(Access::Write));
/// assert!(!Perms::R.allows(Access::Exec));
/// assert_eq!(Perms::RX.to_string(), "r-x");
/// assert!(Perms::W.validate().is_err()); // EPT forbids write without read
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Perms(u8);

impl Perms {
    /// No access (not mappable).
    pub const NONE: Perms = Perms(0);
    /// Read only.
    pub const R: Perms = Perms(READ as u8);
    /// Write only (not mappable: an EPT misconfiguration).
    pub const W: Perms = Perms(WRITE as u8);
    /// Execute only.
    pub const X: Perms = Perms(EXEC as u8);
    /// Read and write.
    pub const RW: Perms = Perms((READ | WRITE) as u8);
    /// Read and execute.
    pub const RX: Perms = Perms((READ | EXEC) as u8);
    /// Read, write and execute.
    pub const RWX: Perms = Perms((READ | WRITE | EXEC) as u8);

    /// The permissions in the low three bits of an entry.
    pub const fn from_entry_bits(bits: u64) -> Self {
        Perms((bits & PERM_MASK) as u8)
    }
    /// The permission bits as entry bits.
    pub const fn entry_bits(self) -> u64 {
        self.0 as u64
    }
    /// Whether an access of kind `access` is allowed.
    pub const fn allows(self, access: Access) -> bool {
        let bit = match access {
            Access::Read => READ,
            Access::Write => WRITE,
            Access::Exec => EXEC,
        };
        self.0 as u64 & bit != 0
    }
    /// Whether a leaf may carry these permissions: at least one bit, and never
    /// write without read (an EPT misconfiguration, SDM 29.3.3.1).
    pub fn validate(self) -> Result<(), super::Stage2Error> {
        if self.0 == 0 || (self.0 as u64 & (READ | WRITE)) == WRITE {
            return Err(super::Stage2Error::InvalidPerms { perms: self });
        }
        Ok(())
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as u64;
        let c = |bit, ch| if b & bit != 0 { ch } else { '-' };
        write!(f, "{}{}{}", c(READ, 'r'), c(WRITE, 'w'), c(EXEC, 'x'))
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perms({self})")
    }
}

/// The kind of access a walker translates for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    /// A read (sets Accessed).
    Read,
    /// A write (sets Accessed and Dirty).
    Write,
    /// An instruction fetch (sets Accessed).
    Exec,
}

/// A decoded leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaf {
    /// The page-aligned host-virtual address the leaf maps.
    pub hva: Hva,
    /// Read, write, execute.
    pub perms: Perms,
    /// The Accessed bit.
    pub accessed: bool,
    /// The Dirty bit.
    pub dirty: bool,
}

/// What an entry holds, decoded for the level it sits at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decoded {
    /// Nothing is mapped here.
    Empty,
    /// A writer is tearing this entry down; walkers restart from the root.
    Frozen,
    /// A pointer to the lower table page (its host-virtual address).
    Table(u64),
    /// A leaf mapping guest memory.
    Leaf(Leaf),
    /// Not a value this table writes (e.g. [`POISON`]): a reclamation bug.
    Corrupt,
}

/// One EPT entry.
///
/// ```
/// use vmm::mm::addr::Hva;
/// use vmm::mm::stage2::{Decoded, Entry, PageSize, Perms};
/// let e = Entry::leaf(Hva(0x7f00_0020_0000), Perms::RW, PageSize::Size2M);
/// assert_eq!(e.0 & 0x7, 0b011); // R and W
/// assert_ne!(e.0 & (1 << 7), 0); // large page
/// match e.decode(2) {
///     Decoded::Leaf(l) => assert_eq!(l.hva, Hva(0x7f00_0020_0000)),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry(pub u64);

impl Entry {
    /// The empty entry.
    pub const EMPTY: Entry = Entry(0);

    /// A write-back, ignore-PAT leaf of `size` mapping `hva` (page-aligned
    /// to `size`, below [`FRAME_LIMIT`]) with `perms`; Accessed and Dirty clear.
    pub const fn leaf(hva: Hva, perms: Perms, size: PageSize) -> Entry {
        let large = match size {
            PageSize::Size4K => 0,
            _ => LARGE,
        };
        Entry(
            (hva.0 & FRAME_MASK)
                | perms.entry_bits()
                | (MEMTYPE_WB << MEMTYPE_SHIFT)
                | IGNORE_PAT
                | large,
        )
    }

    /// A table entry pointing at the table page at host-virtual `addr`
    /// (4 KiB aligned, below [`FRAME_LIMIT`]). Table entries allow all
    /// accesses; the leaf decides.
    pub const fn table(addr: u64) -> Entry {
        Entry((addr & FRAME_MASK) | READ | WRITE | EXEC)
    }

    /// Whether the entry is the frozen marker.
    pub const fn is_frozen(self) -> bool {
        self.0 == FROZEN
    }

    /// The address in the frame field.
    pub const fn frame_addr(self) -> u64 {
        self.0 & FRAME_MASK
    }

    /// The permission bits.
    pub const fn perms(self) -> Perms {
        Perms::from_entry_bits(self.0)
    }

    /// The same entry with its permission bits replaced.
    pub const fn with_perms(self, perms: Perms) -> Entry {
        Entry((self.0 & !PERM_MASK) | perms.entry_bits())
    }

    /// Decodes the entry as found in a table at `level` (1..=4).
    pub fn decode(self, level: u8) -> Decoded {
        let v = self.0;
        if v == 0 {
            return Decoded::Empty;
        }
        if v == FROZEN {
            return Decoded::Frozen;
        }
        if v & (RESERVED_MASK | FROZEN_BIT) != 0 || v & PERM_MASK == 0 {
            return Decoded::Corrupt;
        }
        let leaf = level == 1 || v & LARGE != 0;
        if !leaf {
            return Decoded::Table(v & FRAME_MASK);
        }
        if level > 3 {
            return Decoded::Corrupt;
        }
        Decoded::Leaf(Leaf {
            hva: Hva(v & FRAME_MASK),
            perms: Perms::from_entry_bits(v),
            accessed: v & ACCESSED != 0,
            dirty: v & DIRTY != 0,
        })
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entry({:#018x})", self.0)
    }
}

/// Whether `gpa` is aligned to `size` and inside the table's address space.
pub(crate) fn gpa_fits(gpa: Gpa, size: PageSize) -> bool {
    gpa.is_aligned(size.bytes()) && gpa.0 < GPA_LIMIT && gpa.0 + size.bytes() <= GPA_LIMIT
}
