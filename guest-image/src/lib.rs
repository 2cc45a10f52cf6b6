//! Test guest programs for `vmm`, built from source by `build.rs`, and the
//! guest<->VMM protocol they speak (see `PROTOCOL.md` in this crate).
//!
//! - [`FIRMWARE_ELF`]: ring-0 exception stubs loaded into every guest.
//! - [`RUNTIME_ELF`]: the ring-3 command loop that runs the built-in programs.
//! - [`protocol`]: ports, guest-physical layout, mailbox and commands, shared
//!   verbatim with the guest code.
//!
//! ```
//! assert_eq!(&guest_image::RUNTIME_ELF[..4], b"\x7fELF");
//! assert!(guest_image::protocol::layout::BOOT_SIZE <= guest_image::protocol::layout::RAM_BASE);
//! ```

#[allow(missing_docs)]
pub mod protocol {
    include!("protocol.rs");
}

/// The firmware image (exception stubs), an ELF64 executable.
pub const FIRMWARE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/firmware.elf"));
/// The guest runtime image, an ELF64 executable linked at `layout::IMAGE_START`.
pub const RUNTIME_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/runtime.elf"));
