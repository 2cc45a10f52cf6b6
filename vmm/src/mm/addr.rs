//! Typed addresses: guest-physical ([`Gpa`]), guest frame numbers ([`Gfn`]) and
//! host-virtual ([`Hva`]).
//!
//! Raw `u64`s never cross a module boundary as addresses; arithmetic that can
//! overflow is checked and returns `None`.
//!
//! ```
//! use vmm::mm::addr::{Gpa, PAGE_SIZE};
//! let a = Gpa(0x4000_0000);
//! assert!(a.is_aligned(PAGE_SIZE));
//! assert_eq!(a.checked_add(PAGE_SIZE), Some(Gpa(0x4000_1000)));
//! assert_eq!(Gpa(u64::MAX).checked_add(1), None);
//! assert_eq!(a.gfn().0, 0x40000);
//! ```

use std::fmt;

/// The base page size of x86-64 and of KVM memslots.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// A 2 MiB huge page (THP, hugetlb default size).
pub const HUGE_2M: u64 = 2 << 20;
/// A 1 GiB huge page.
pub const HUGE_1G: u64 = 1 << 30;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// `self + bytes`, or `None` on overflow.
            pub fn checked_add(self, bytes: u64) -> Option<Self> {
                self.0.checked_add(bytes).map(Self)
            }
            /// `self - bytes`, or `None` on underflow.
            pub fn checked_sub(self, bytes: u64) -> Option<Self> {
                self.0.checked_sub(bytes).map(Self)
            }
            /// The distance `self - base` in bytes, or `None` if `base > self`.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub fn is_aligned(self, align: u64) -> bool {
                debug_assert!(align.is_power_of_two());
                self.0 & (align - 1) == 0
            }
            /// Rounds down to a multiple of `align` (a power of two).
            pub fn align_down(self, align: u64) -> Self {
                debug_assert!(align.is_power_of_two());
                Self(self.0 & !(align - 1))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A guest-physical address.
    Gpa
);
address_type!(
    /// A host-virtual address (a pointer into a host mapping of guest memory).
    Hva
);

impl Gpa {
    /// The guest frame (4 KiB page) holding this address.
    pub fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

/// A guest frame number: a guest-physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The first guest-physical address of this frame.
    pub fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
}

/// A half-open guest-physical range `[start, start + len)`.
///
/// ```
/// use vmm::mm::addr::{Gpa, GpaRange};
/// let r = GpaRange::new(Gpa(0x1000), 0x2000).unwrap();
/// assert_eq!(r.end(), Gpa(0x3000));
/// assert!(r.contains(Gpa(0x2fff)));
/// assert!(!r.contains(Gpa(0x3000)));
/// assert!(r.overlaps(&GpaRange::new(Gpa(0x2000), 0x8000).unwrap()));
/// assert!(GpaRange::new(Gpa(u64::MAX), 2).is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct GpaRange {
    start: Gpa,
    len: u64,
}

impl GpaRange {
    /// A range of `len` bytes from `start`; `None` if the end overflows.
    pub fn new(start: Gpa, len: u64) -> Option<Self> {
        start.0.checked_add(len)?;
        Some(Self { start, len })
    }
    /// A range known to be valid because it was copied from a `GpaRange`
    /// (checked in debug builds only): for hot paths that store a range's
    /// parts in atomics and load them back.
    #[inline]
    pub(crate) fn from_valid_parts(start: Gpa, len: u64) -> Self {
        debug_assert!(start.0.checked_add(len).is_some(), "{start}+{len:#x}");
        Self { start, len }
    }
    /// The range `[start, end)`; `None` if `end < start`.
    pub fn from_bounds(start: Gpa, end: Gpa) -> Option<Self> {
        Some(Self {
            start,
            len: end.0.checked_sub(start.0)?,
        })
    }
    /// First address.
    pub fn start(&self) -> Gpa {
        self.start
    }
    /// One past the last address.
    pub fn end(&self) -> Gpa {
        Gpa(self.start.0 + self.len)
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether `gpa` lies inside.
    pub fn contains(&self, gpa: Gpa) -> bool {
        gpa >= self.start && gpa < self.end()
    }
    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &GpaRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }
    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &GpaRange) -> Option<GpaRange> {
        let start = self.start.max(other.start);
        let end = self.end().min(other.end());
        (start < end).then(|| GpaRange {
            start,
            len: end.0 - start.0,
        })
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gpa_align_down_rounds_to_boundary() {
        assert_eq!(Gpa(0x20_1234).align_down(HUGE_2M), Gpa(0x20_0000));
    }

    #[test]
    fn test_range_intersect_disjoint_is_none() {
        let a = GpaRange::new(Gpa(0), 0x1000).unwrap();
        let b = GpaRange::new(Gpa(0x1000), 0x1000).unwrap();
        assert_eq!(a.intersect(&b), None);
        assert!(!a.overlaps(&b));
    }

    #[test]
    fn test_range_from_bounds_rejects_reversed() {
        assert!(GpaRange::from_bounds(Gpa(2), Gpa(1)).is_none());
    }
}
