//! Guest page sizes other than the boot identity map's 2 MiB over one range
//! of it (pure: writes into byte slices); the entries' places come from
//! [`super::tables`].
//!
//! - 4 KiB: one page table per 2 MiB of the range, identity-mapping it with
//!   4 KiB PTEs, written into guest memory the caller plugs; the boot region's
//!   page-directory entries for those 2 MiB are then pointed at them
//!   ([`PdPatch`]). The guest walks them like any page table.
//! - 1 GiB: the PDPT entry of the range's GiB becomes a 1 GiB leaf. Only valid
//!   when KVM's CPUID offers `pdpe1gb` (it does not on shadow-paging hosts).
//!
//! Both must be written before the vCPUs first run (no TLB shootdown exists).
//!
//! ```
//! use vmm::boot::paging::{tables_len, write_4k_tables};
//! let mut tables = vec![0u8; tables_len(4 << 20) as usize];
//! let patches = write_4k_tables(&mut tables, 0x4000_0000, 4 << 30, 4 << 20).unwrap();
//! assert_eq!(patches.len(), 2);
//! assert_eq!(patches[1].value & !0xFFF, 0x4000_1000);
//! ```

use guest_image::protocol::layout;

use super::tables::{pd_entry_gpa, pdpt_entry_gpa, pte};
use crate::mm::addr::{HUGE_1G, HUGE_2M, PAGE_SIZE};

/// Errors building page tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageTableError {
    /// The range is not 2 MiB (4K tables) or 1 GiB (1G leaf) aligned.
    #[error("range start {start:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// Range start.
        start: u64,
        /// Required alignment.
        align: u64,
    },
    /// The tables buffer is too small.
    #[error("tables buffer of {have:#x} bytes, {need:#x} needed for a range of {len:#x}")]
    Buffer {
        /// Bytes given.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// Range length.
        len: u64,
    },
    /// The range reaches past the boot identity map's page directories.
    #[error("range [{start:#x}, +{len:#x}) reaches past the identity map end {end:#x}")]
    PastIdentity {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Identity map end.
        end: u64,
    },
}

/// One 8-byte entry to store into the boot region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdPatch {
    /// Guest-physical address of the entry (inside the boot region).
    pub entry_gpa: u64,
    /// The value to store.
    pub value: u64,
}

/// Bytes of page tables that map `len` bytes (from a 2 MiB-aligned start) with 4 KiB pages.
pub fn tables_len(len: u64) -> u64 {
    len.div_ceil(HUGE_2M) * PAGE_SIZE
}

/// Writes 4 KiB page tables identity-mapping `[start, start + len)` (rounded
/// up to 2 MiB) into `tables`, the host view of guest memory at `tables_gpa`.
/// Returns the page-directory entries to patch in the boot region.
pub fn write_4k_tables(
    tables: &mut [u8],
    tables_gpa: u64,
    start: u64,
    len: u64,
) -> Result<Vec<PdPatch>, PageTableError> {
    if start % HUGE_2M != 0 {
        return Err(PageTableError::Misaligned {
            start,
            align: HUGE_2M,
        });
    }
    let need = tables_len(len);
    if (tables.len() as u64) < need {
        return Err(PageTableError::Buffer {
            have: tables.len() as u64,
            need,
            len,
        });
    }
    if start + len.div_ceil(HUGE_2M) * HUGE_2M > layout::IDENTITY_END {
        return Err(PageTableError::PastIdentity {
            start,
            len,
            end: layout::IDENTITY_END,
        });
    }
    let flags = pte::USER_RW;
    let mut patches = Vec::new();
    for chunk in 0..len.div_ceil(HUGE_2M) {
        let base = start + chunk * HUGE_2M;
        let table = chunk * PAGE_SIZE;
        for i in 0..512u64 {
            let at = (table + i * 8) as usize;
            let value = (base + i * PAGE_SIZE) | flags;
            tables[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        patches.push(PdPatch {
            entry_gpa: pd_entry_gpa(base),
            value: (tables_gpa + table) | flags,
        });
    }
    Ok(patches)
}

/// The PDPT entry that maps the GiB at `start` with one 1 GiB page.
pub fn gig_leaf(start: u64) -> Result<PdPatch, PageTableError> {
    if start % HUGE_1G != 0 {
        return Err(PageTableError::Misaligned {
            start,
            align: HUGE_1G,
        });
    }
    Ok(PdPatch {
        entry_gpa: pdpt_entry_gpa(start),
        value: start | pte::USER_RW | pte::HUGE,
    })
}

/// Stores `patches` into `boot`, the host view of `[0, BOOT_SIZE)`.
pub fn apply_patches(boot: &mut [u8], patches: &[PdPatch]) {
    for p in patches {
        let at = p.entry_gpa as usize;
        boot[at..at + 8].copy_from_slice(&p.value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tables::write_boot_tables;

    fn get(mem: &[u8], at: u64) -> u64 {
        u64::from_le_bytes(mem[at as usize..at as usize + 8].try_into().unwrap())
    }

    #[test]
    fn test_4k_tables_walk_to_identity_through_patched_pd() {
        let mut boot = vec![0u8; layout::BOOT_SIZE as usize];
        write_boot_tables(&mut boot, 1, 64 << 30).unwrap();
        let start = 4u64 << 30;
        let tables_gpa = 0x4000_0000;
        let mut tables = vec![0u8; tables_len(3 << 20) as usize];
        let patches = write_4k_tables(&mut tables, tables_gpa, start, 3 << 20).unwrap();
        assert_eq!(patches.len(), 2);
        apply_patches(&mut boot, &patches);
        for va in [start, start + 0x1234, start + (2 << 20) + 0x5000] {
            let pdpte = get(&boot, layout::PDPT + (va >> 30) * 8);
            let pde = get(&boot, (pdpte & !0xFFF) + ((va >> 21) & 511) * 8);
            assert_eq!(pde & pte::HUGE, 0, "a table, not a 2 MiB leaf");
            let table_off = (pde & !0xFFF) - tables_gpa;
            let pte_v = get(&tables, table_off + ((va >> 12) & 511) * 8);
            assert_ne!(pte_v & pte::USER, 0);
            assert_eq!((pte_v & !0xFFF) | (va & 0xFFF), va);
        }
        // The neighbouring 2 MiB keeps its identity leaf.
        let pde = get(&boot, layout::PDS + 4 * 0x1000 + 2 * 8);
        assert_eq!(
            pde,
            (start + (4 << 20)) | pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE
        );
    }

    #[test]
    fn test_4k_tables_misaligned_or_short_buffer_is_rejected() {
        let mut t = vec![0u8; 4096];
        assert!(matches!(
            write_4k_tables(&mut t, 0, 0x1000, 4096),
            Err(PageTableError::Misaligned { .. })
        ));
        assert!(matches!(
            write_4k_tables(&mut t, 0, 4 << 30, 4 << 20),
            Err(PageTableError::Buffer { .. })
        ));
    }

    #[test]
    fn test_gig_leaf_sets_ps_at_the_pdpt_slot() {
        let p = gig_leaf(4 << 30).unwrap();
        assert_eq!(p.entry_gpa, layout::PDPT + 32);
        assert_ne!(p.value & pte::HUGE, 0);
        assert!(gig_leaf(3 << 29).is_err());
    }
}
