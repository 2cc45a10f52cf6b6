//! Building what a test guest boots with, as pure functions over byte buffers:
//! [`elf`] loads guest images, [`tables`] writes page tables, GDT, IDT and TSSes,
//! [`paging`] maps one range of the identity map with 4 KiB or 1 GiB pages.
//! No KVM here; `crate::vm` writes the results into guest memory and registers.

pub mod elf;
pub mod paging;
pub mod tables;
