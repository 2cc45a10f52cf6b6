//! The boot region's CPU structures: identity page tables, GDT, IDT and one TSS
//! per vCPU, written into a host view of guest memory `[0, BOOT_SIZE)`.
//!
//! - Paging: 4-level, identity over `[0, identity_end)` in 2 MiB pages, all
//!   user-accessible, so a ring-3 guest can
//!   touch any guest-physical address and plugging memory needs no page-table
//!   change. Addresses at or past `identity_end` are not present (#PF).
//! - GDT: null, ring-0 code/data, ring-3 data/code, then a 64-bit TSS per vCPU.
//! - IDT: vectors 0-31 are ring-0 interrupt gates into the firmware stubs.
//! - TSS `i`: RSP0 = the end of vCPU `i`'s ring-0 stack page.
//!
//! ```
//! use vmm::boot::tables::{write_boot_tables, pte};
//! use guest_image::protocol::layout;
//! let mut boot = vec![0u8; layout::BOOT_SIZE as usize];
//! write_boot_tables(&mut boot, 2, 64 << 30).unwrap();
//! let pml4e = u64::from_le_bytes(boot[0x8000..0x8008].try_into().unwrap());
//! assert_eq!(pml4e, layout::PDPT | pte::PRESENT | pte::WRITABLE | pte::USER);
//! ```

use guest_image::protocol::layout;

use crate::mm::addr::{HUGE_1G, HUGE_2M};

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1 << 0;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// User-accessible.
    pub const USER: u64 = 1 << 2;
    /// Large page (PS) in a PDPTE or PDE.
    pub const HUGE: u64 = 1 << 7;
    /// The bits of every entry the identity map writes: present, writable,
    /// user-accessible.
    pub const USER_RW: u64 = PRESENT | WRITABLE | USER;
}

/// Guest-physical address of the identity map's PDPT entry for `gpa`'s GiB.
pub fn pdpt_entry_gpa(gpa: u64) -> u64 {
    layout::PDPT + (gpa / HUGE_1G) * 8
}

/// Guest-physical address of the identity map's page-directory entry (a
/// 2 MiB leaf) for `gpa`.
pub fn pd_entry_gpa(gpa: u64) -> u64 {
    pd_gpa(gpa) + ((gpa >> 21) & 511) * 8
}

/// Guest-physical address of the page directory of `gpa`'s GiB.
fn pd_gpa(gpa: u64) -> u64 {
    layout::PDS + (gpa / HUGE_1G) * 0x1000
}

/// Why the tables cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TablesError {
    /// The vCPU count does not fit the boot region.
    #[error("{0} vCPUs requested; the boot region has room for 1 to {max}", max = layout::MAX_VCPUS)]
    VcpuCount(u64),
    /// The identity window is too small to reach guest RAM or not 1 GiB-aligned.
    #[error(
        "identity window end {0:#x} must be a multiple of 1 GiB, at least 2 GiB and at most 64 GiB"
    )]
    Window(u64),
    /// The buffer is not the boot region.
    #[error("boot buffer holds {0:#x} bytes, expected {expected:#x}", expected = layout::BOOT_SIZE)]
    BufferSize(usize),
}

fn put_u64(mem: &mut [u8], at: u64, v: u64) {
    mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// A flat 64-bit code/data segment descriptor.
const fn segment(dpl: u64, code: bool) -> u64 {
    let access = 0x80 | (dpl << 5) | 0x10 | if code { 0x0A } else { 0x02 };
    // limit 0xfffff, G=1; code: L=1 (64-bit); data: D/B=1.
    let flags = if code { 0xA } else { 0xC };
    0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)
}

/// GDT entry values, in selector order.
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    segment(0, true),  // KERNEL_CS 0x08
    segment(0, false), // KERNEL_DS 0x10
    segment(3, false), // USER_DS 0x18
    segment(3, true),  // USER_CS 0x20
];

/// Size in bytes of the GDT for `vcpus` vCPUs (for the GDTR limit).
pub fn gdt_size(vcpus: u64) -> u64 {
    (GDT_ENTRIES.len() as u64) * 8 + 16 * vcpus
}

/// Guest-physical address of vCPU `index`'s TSS.
pub fn tss_addr(index: u64) -> u64 {
    layout::TSS + index * layout::TSS_STRIDE
}

/// Writes the page tables, GDT, IDT and TSSes for `vcpus` vCPUs into `boot`,
/// a zeroed view of guest-physical `[0, BOOT_SIZE)`.
pub fn write_boot_tables(
    boot: &mut [u8],
    vcpus: u64,
    identity_end: u64,
) -> Result<(), TablesError> {
    if boot.len() as u64 != layout::BOOT_SIZE {
        return Err(TablesError::BufferSize(boot.len()));
    }
    if vcpus == 0 || vcpus > layout::MAX_VCPUS {
        return Err(TablesError::VcpuCount(vcpus));
    }
    if identity_end % HUGE_1G != 0 || !(2 * HUGE_1G..=layout::IDENTITY_END).contains(&identity_end)
    {
        return Err(TablesError::Window(identity_end));
    }
    put_u64(boot, layout::PML4, layout::PDPT | pte::USER_RW);
    for gib in 0..identity_end / HUGE_1G {
        let base = gib * HUGE_1G;
        put_u64(boot, pdpt_entry_gpa(base), pd_gpa(base) | pte::USER_RW);
        for gpa in (base..base + HUGE_1G).step_by(HUGE_2M as usize) {
            put_u64(boot, pd_entry_gpa(gpa), gpa | pte::USER_RW | pte::HUGE);
        }
    }

    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        put_u64(boot, layout::GDT + i as u64 * 8, *e);
    }
    for cpu in 0..vcpus {
        let base = tss_addr(cpu);
        let limit = 103u64;
        // 64-bit TSS descriptor, type 0xB (busy: TR is loaded with it), present.
        let low = (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (0x8B << 40)
            | (((base >> 24) & 0xFF) << 56);
        let sel = u64::from(layout::TSS_SEL0) + 16 * cpu;
        put_u64(boot, layout::GDT + sel, low);
        put_u64(boot, layout::GDT + sel + 8, base >> 32);
        // TSS: RSP0 at offset 4; I/O map base past the limit (no bitmap).
        put_u64(boot, base + 4, layout::kernel_stack_top(cpu));
        boot[(base + 102) as usize..(base + 104) as usize].copy_from_slice(&104u16.to_le_bytes());
    }

    for vector in 0..32u64 {
        let handler = layout::FIRMWARE + vector * layout::STUB_STRIDE;
        let low = (handler & 0xFFFF)
            | (u64::from(layout::KERNEL_CS) << 16)
            | (0x8E << 40) // present, DPL 0, 64-bit interrupt gate
            | (((handler >> 16) & 0xFFFF) << 48);
        put_u64(boot, layout::IDT + vector * 16, low);
        put_u64(boot, layout::IDT + vector * 16 + 8, handler >> 32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(mem: &[u8], at: u64) -> u64 {
        u64::from_le_bytes(mem[at as usize..at as usize + 8].try_into().unwrap())
    }

    fn built(vcpus: u64, end: u64) -> Vec<u8> {
        let mut boot = vec![0u8; layout::BOOT_SIZE as usize];
        write_boot_tables(&mut boot, vcpus, end).unwrap();
        boot
    }

    /// Walks the tables like the MMU and returns the physical address.
    fn walk(mem: &[u8], va: u64) -> Option<u64> {
        let pml4e = get(mem, layout::PML4 + ((va >> 39) & 511) * 8);
        if pml4e & pte::PRESENT == 0 {
            return None;
        }
        let pdpte = get(mem, (pml4e & !0xFFF) + ((va >> 30) & 511) * 8);
        if pdpte & pte::PRESENT == 0 {
            return None;
        }
        assert_ne!(pdpte & pte::USER, 0);
        assert_eq!(pdpte & pte::HUGE, 0, "no 1 GiB pages");
        let pde = get(mem, (pdpte & !0xFFF) + ((va >> 21) & 511) * 8);
        assert_ne!(pde & pte::HUGE, 0);
        Some((pde & !0xFFF & !(HUGE_2M - 1)) | (va & (HUGE_2M - 1)))
    }

    #[test]
    fn test_tables_identity_map_covers_window_and_nothing_past_it() {
        let mem = built(1, 4 << 30);
        for va in [
            0u64,
            0x1234,
            0x3F_FFFF,
            layout::RAM_BASE + 0x5000,
            (4 << 30) - 8,
        ] {
            assert_eq!(walk(&mem, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(&mem, 4 << 30), None);
        assert_eq!(walk(&mem, 64 << 30), None);
    }

    #[test]
    fn test_tables_gdt_has_ring3_code_and_busy_tss_per_vcpu() {
        let mem = built(3, 2 << 30);
        let user_cs = get(&mem, layout::GDT + u64::from(layout::USER_CS & !3));
        assert_eq!((user_cs >> 45) & 3, 3, "DPL");
        assert_eq!((user_cs >> 53) & 1, 1, "L bit");
        for cpu in 0..3 {
            let desc = get(&mem, layout::GDT + u64::from(layout::TSS_SEL0) + 16 * cpu);
            assert_eq!((desc >> 40) & 0xFF, 0x8B);
            let base = ((desc >> 16) & 0xFF_FFFF) | (((desc >> 56) & 0xFF) << 24);
            assert_eq!(base, tss_addr(cpu));
            assert_eq!(get(&mem, base + 4), layout::kernel_stack_top(cpu));
        }
        assert_eq!(gdt_size(3), 5 * 8 + 48);
    }

    #[test]
    fn test_tables_idt_gates_point_at_firmware_stubs() {
        let mem = built(1, 2 << 30);
        let gate = get(&mem, layout::IDT + 14 * 16);
        let handler = (gate & 0xFFFF) | (((gate >> 48) & 0xFFFF) << 16);
        assert_eq!(handler, layout::FIRMWARE + 14 * layout::STUB_STRIDE);
        assert_eq!((gate >> 16) & 0xFFFF, u64::from(layout::KERNEL_CS));
        assert_eq!((gate >> 40) & 0xFF, 0x8E);
    }

    #[test]
    fn test_tables_bad_inputs_are_rejected() {
        let mut boot = vec![0u8; layout::BOOT_SIZE as usize];
        assert_eq!(
            write_boot_tables(&mut boot, 0, 2 << 30),
            Err(TablesError::VcpuCount(0))
        );
        assert_eq!(
            write_boot_tables(&mut boot, 65, 2 << 30),
            Err(TablesError::VcpuCount(65))
        );
        assert_eq!(
            write_boot_tables(&mut boot, 1, 3 << 29),
            Err(TablesError::Window(3 << 29))
        );
        assert_eq!(
            write_boot_tables(&mut boot[..10], 1, 2 << 30),
            Err(TablesError::BufferSize(10))
        );
    }
}
