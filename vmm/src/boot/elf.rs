//! A minimal ELF64 loader for guest images: static x86-64 executables whose
//! loadable segments are placed at their physical addresses (the guest runs on
//! an identity map, so physical = virtual).
//!
//! ```
//! use vmm::boot::elf::ElfImage;
//! use vmm::mm::addr::{Gpa, GpaRange};
//! let window = GpaRange::from_bounds(Gpa(0x10_0000), Gpa(0x40_0000)).unwrap();
//! let image = ElfImage::parse(guest_image::RUNTIME_ELF, window).unwrap();
//! assert_eq!(image.entry, Gpa(0x10_0000));
//! assert!(!image.segments.is_empty());
//! ```

use crate::mm::addr::{Gpa, GpaRange};

/// Why an image cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than its headers claim.
    #[error("image is truncated: {what} needs bytes up to {needed:#x} but the file has {len:#x}")]
    Truncated {
        /// The structure that did not fit.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes the file has.
        len: u64,
    },
    /// Not an ELF file.
    #[error("not an ELF image (bad magic)")]
    BadMagic,
    /// ELF, but not a little-endian x86-64 executable.
    #[error("unsupported ELF: {0} (need a 64-bit little-endian x86-64 static executable)")]
    Unsupported(&'static str),
    /// A segment lies outside the window the image may occupy.
    #[error("segment {range} lies outside the image window {window}")]
    OutsideWindow {
        /// The segment's guest-physical range.
        range: GpaRange,
        /// Where images may go.
        window: GpaRange,
    },
    /// The entry point is not inside any loaded segment.
    #[error("entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    /// No loadable segment.
    #[error("image has no loadable segment")]
    Empty,
}

/// One `PT_LOAD` segment: `data` goes at `gpa`, then zeros up to `mem_size`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Guest-physical load address.
    pub gpa: Gpa,
    /// Bytes from the file.
    pub data: &'a [u8],
    /// Size in memory (>= `data.len()`; the rest is zero-filled).
    pub mem_size: u64,
}

/// A parsed, validated guest image.
#[derive(Debug, Clone)]
pub struct ElfImage<'a> {
    /// Entry point.
    pub entry: Gpa,
    /// Loadable segments.
    pub segments: Vec<Segment<'a>>,
}

fn read<const N: usize>(b: &[u8], off: u64, what: &'static str) -> Result<[u8; N], ElfError> {
    let end = off.saturating_add(N as u64);
    b.get(off as usize..end as usize)
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Truncated {
            what,
            needed: end,
            len: b.len() as u64,
        })
}
fn u16_at(b: &[u8], off: u64, what: &'static str) -> Result<u16, ElfError> {
    read::<2>(b, off, what).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: u64, what: &'static str) -> Result<u32, ElfError> {
    read::<4>(b, off, what).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: u64, what: &'static str) -> Result<u64, ElfError> {
    read::<8>(b, off, what).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

impl<'a> ElfImage<'a> {
    /// Parses `bytes` and checks every segment fits in `window`.
    pub fn parse(bytes: &'a [u8], window: GpaRange) -> Result<Self, ElfError> {
        let ident = read::<16>(bytes, 0, "ELF header")?;
        if ident[..4] != *b"\x7fELF" {
            return Err(ElfError::BadMagic);
        }
        if ident[4] != 2 {
            return Err(ElfError::Unsupported("not 64-bit"));
        }
        if ident[5] != 1 {
            return Err(ElfError::Unsupported("not little-endian"));
        }
        if u16_at(bytes, 16, "ELF header")? != ET_EXEC {
            return Err(ElfError::Unsupported("not an executable (ET_EXEC)"));
        }
        if u16_at(bytes, 18, "ELF header")? != EM_X86_64 {
            return Err(ElfError::Unsupported("not x86-64"));
        }
        let entry = u64_at(bytes, 24, "ELF header")?;
        let phoff = u64_at(bytes, 32, "ELF header")?;
        let phentsize = u64::from(u16_at(bytes, 54, "ELF header")?);
        let phnum = u64::from(u16_at(bytes, 56, "ELF header")?);
        if phentsize < 56 {
            return Err(ElfError::Unsupported("program header entries too small"));
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let ph = phoff.saturating_add(i.saturating_mul(phentsize));
            if u32_at(bytes, ph, "program header")? != PT_LOAD {
                continue;
            }
            let offset = u64_at(bytes, ph + 8, "program header")?;
            let paddr = u64_at(bytes, ph + 24, "program header")?;
            let filesz = u64_at(bytes, ph + 32, "program header")?;
            let memsz = u64_at(bytes, ph + 40, "program header")?;
            if memsz < filesz {
                return Err(ElfError::Unsupported("segment memory size below file size"));
            }
            let file_end = offset.saturating_add(filesz);
            let data =
                bytes
                    .get(offset as usize..file_end as usize)
                    .ok_or(ElfError::Truncated {
                        what: "segment data",
                        needed: file_end,
                        len: bytes.len() as u64,
                    })?;
            let range = GpaRange::new(Gpa(paddr), memsz).ok_or(ElfError::OutsideWindow {
                range: GpaRange::new(Gpa(paddr), 0).expect("empty range cannot overflow"),
                window,
            })?;
            if range.start() < window.start() || range.end() > window.end() {
                return Err(ElfError::OutsideWindow { range, window });
            }
            segments.push(Segment {
                gpa: Gpa(paddr),
                data,
                mem_size: memsz,
            });
        }
        if segments.is_empty() {
            return Err(ElfError::Empty);
        }
        let inside = segments
            .iter()
            .any(|s| entry >= s.gpa.0 && entry < s.gpa.0 + s.mem_size);
        if !inside {
            return Err(ElfError::BadEntry(entry));
        }
        Ok(Self {
            entry: Gpa(entry),
            segments,
        })
    }

    /// Copies the segments into `mem`, a host view of guest memory starting at
    /// guest-physical `base`, zero-filling each segment's tail.
    ///
    /// # Panics
    /// If a segment does not fit in `mem` (callers size `mem` to the window
    /// passed to [`ElfImage::parse`]).
    pub fn load_into(&self, mem: &mut [u8], base: Gpa) {
        for s in &self.segments {
            let start = (s.gpa.0 - base.0) as usize;
            let dst = &mut mem[start..start + s.mem_size as usize];
            dst[..s.data.len()].copy_from_slice(s.data);
            dst[s.data.len()..].fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> GpaRange {
        GpaRange::from_bounds(Gpa(0x10_0000), Gpa(0x40_0000)).unwrap()
    }

    #[test]
    fn test_parse_builtin_runtime_loads_and_zero_fills() {
        let img = ElfImage::parse(guest_image::RUNTIME_ELF, window()).unwrap();
        let mut mem = vec![0xAAu8; 0x30_0000];
        img.load_into(&mut mem, Gpa(0x10_0000));
        let first = &img.segments[0];
        assert_eq!(&mem[..first.data.len()], first.data);
    }

    #[test]
    fn test_parse_firmware_outside_image_window_is_rejected() {
        let err = ElfImage::parse(guest_image::FIRMWARE_ELF, window()).unwrap_err();
        assert!(matches!(err, ElfError::OutsideWindow { .. }), "{err}");
    }

    #[test]
    fn test_parse_garbage_is_bad_magic() {
        assert_eq!(
            ElfImage::parse(b"hello, this is not an ELF file", window()).unwrap_err(),
            ElfError::BadMagic
        );
    }

    #[test]
    fn test_parse_truncated_header_names_sizes() {
        let err = ElfImage::parse(&guest_image::RUNTIME_ELF[..40], window()).unwrap_err();
        assert!(matches!(err, ElfError::Truncated { len: 40, .. }), "{err}");
    }

    #[test]
    fn test_parse_wrong_machine_is_unsupported() {
        let mut bytes = guest_image::RUNTIME_ELF.to_vec();
        bytes[18] = 0xB7; // EM_AARCH64
        assert_eq!(
            ElfImage::parse(&bytes, window()).unwrap_err(),
            ElfError::Unsupported("not x86-64")
        );
    }

    #[test]
    fn test_parse_entry_outside_segments_is_rejected() {
        let mut bytes = guest_image::RUNTIME_ELF.to_vec();
        bytes[24..32].copy_from_slice(&0x3f_0000u64.to_le_bytes());
        assert_eq!(
            ElfImage::parse(&bytes, window()).unwrap_err(),
            ElfError::BadEntry(0x3f_0000)
        );
    }
}
