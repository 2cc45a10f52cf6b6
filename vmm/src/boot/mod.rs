//! Building what a test guest boots with, as pure functions over byte buffers:
//! [`elf`] loads guest images, [`tables`] writes page tables, GDT, IDT and TSSes,
//! [`paging`] maps one range of the identity map with 4 KiB or 1 GiB pages;
//! [`memory`] is the VMM's vm-memory view of the boot region.
//! No KVM here; the VM builder writes the results into guest memory and registers.

pub mod elf;
pub mod memory;
pub mod paging;
pub mod tables;
