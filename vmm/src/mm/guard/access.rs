//! [`SlotRef`]: a reader's guard on one slot, and the accesses it allows.
//!
//! Accesses are volatile: guest memory is shared with vCPUs and other
//! threads by design. An aligned 8-byte access is one host load or store
//! (`mov`), so it is never torn; byte copies are done byte by byte.
//! Devices that move blocks take a vm-memory [`VolatileSlice`] of the piece
//! they need ([`SlotRef::slice`], [`SlotRef::slice_for_write`]) and use its
//! safe copy and `Bytes` methods; the slice borrows the guard, so it cannot
//! outlive it.

use std::fmt;

use vm_memory::VolatileSlice;

use super::GuardError;
use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::slot_lock::SlotReadGuard;
use crate::mm::slot_map::{Slot, SlotFlags};

/// A guard on one slot: the host memory behind it stays mapped and is not
/// discarded while the guard lives. Released on drop (one `fetch_sub`, or
/// nothing for a slot a walk holds by its announcement).
#[must_use = "the slot is released as soon as the guard is dropped"]
pub struct SlotRef<'a> {
    hold: Hold<'a>,
    hva: Hva,
    flags: SlotFlags,
}

/// What keeps a [`SlotRef`]'s slot.
enum Hold<'a> {
    /// A reference on the slot's cell.
    Counted(SlotReadGuard<'a>),
    /// A walk's announcement covering the slot (see `guard::announce`):
    /// writers deleting it wait until the walk moves on, which it does only
    /// after the visitor let go of this reference.
    Announced {
        slot: u32,
        generation: u64,
        range: GpaRange,
    },
}

impl fmt::Debug for SlotRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotRef")
            .field("slot", &self.slot_id())
            .field("range", &format_args!("{}", self.range()))
            .field("hva", &self.hva)
            .field("flags", &self.flags)
            .finish()
    }
}

impl<'a> SlotRef<'a> {
    /// Wraps a validated guard on `slot`'s cell (same generation).
    #[inline]
    pub(super) fn new(guard: SlotReadGuard<'a>, slot: &Slot) -> Self {
        debug_assert_eq!(guard.generation(), slot.generation());
        Self {
            hold: Hold::Counted(guard),
            hva: slot.hva(),
            flags: slot.flags(),
        }
    }

    /// Wraps `slot` of the published map, held by a walk's announcement
    /// that covers it: the caller must not let the result outlive that
    /// announcement (the walk keeps it in the batch it announced).
    #[inline]
    pub(super) fn announced(slot: &Slot) -> Self {
        Self {
            hold: Hold::Announced {
                slot: slot.id().0,
                generation: slot.generation(),
                range: slot.range(),
            },
            hva: slot.hva(),
            flags: slot.flags(),
        }
    }

    /// Wraps a validated guard whose slot starts at host address `hva` (a
    /// translation cached with the guard's generation).
    #[inline]
    pub(super) fn from_parts(guard: SlotReadGuard<'a>, hva: Hva, read_only: bool) -> Self {
        Self {
            hold: Hold::Counted(guard),
            hva,
            flags: SlotFlags {
                read_only,
                ..SlotFlags::NONE
            },
        }
    }

    /// The slot id.
    pub fn slot_id(&self) -> u32 {
        match &self.hold {
            Hold::Counted(guard) => guard.slot_id(),
            Hold::Announced { slot, .. } => *slot,
        }
    }

    /// Whether a writer has excluded the slot since the guard was taken (a
    /// hint, see [`SlotReadGuard::exclusion_seen`]).
    pub(super) fn exclusion_seen(&self) -> bool {
        match &self.hold {
            Hold::Counted(guard) => guard.exclusion_seen(),
            // A writer waits for the walk to move on instead.
            Hold::Announced { .. } => false,
        }
    }

    /// Whether a walk's announcement holds the slot (not a count).
    #[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
    pub(super) fn is_announced(&self) -> bool {
        matches!(self.hold, Hold::Announced { .. })
    }

    /// The slot's generation (its identity in the slot map).
    pub fn generation(&self) -> u64 {
        match &self.hold {
            Hold::Counted(guard) => guard.generation(),
            Hold::Announced { generation, .. } => *generation,
        }
    }

    /// The slot's guest-physical range.
    #[inline]
    pub fn range(&self) -> GpaRange {
        match &self.hold {
            Hold::Counted(guard) => guard.range(),
            Hold::Announced { range, .. } => *range,
        }
    }

    /// Whether the slot is read-only to the guest (and to [`write_u64`](Self::write_u64)).
    pub fn read_only(&self) -> bool {
        self.flags.read_only
    }

    /// The host address of `[gpa, gpa + len)`, which must lie inside the
    /// slot. Valid only while the guard lives.
    ///
    /// # Errors
    /// [`GuardError::OutOfSlot`].
    #[inline]
    pub fn hva(&self, gpa: Gpa, len: u64) -> Result<Hva, GuardError> {
        let range = self.range();
        let out = || GuardError::OutOfSlot {
            gpa,
            len,
            slot: self.slot_id(),
        };
        // Below the start, `delta` wraps to a huge value and fails the first
        // test; past it, the second test cannot overflow.
        let delta = gpa.0.wrapping_sub(range.start().0);
        if delta > range.len() || len > range.len() - delta {
            return Err(out());
        }
        Ok(Hva(self.hva.0 + delta))
    }

    fn word_ptr(&self, gpa: Gpa) -> Result<*mut u64, GuardError> {
        if !gpa.is_aligned(8) {
            return Err(GuardError::Unaligned { gpa });
        }
        Ok(self.hva(gpa, 8)?.0 as *mut u64)
    }

    /// Reads the aligned `u64` at `gpa` with one host load.
    ///
    /// # Errors
    /// [`GuardError::Unaligned`], [`GuardError::OutOfSlot`].
    #[inline]
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, GuardError> {
        let p = self.word_ptr(gpa)?;
        // SAFETY: `p` is 8-aligned and its 8 bytes lie inside the slot
        // (`hva` checked the range); the slot's host memory stays mapped while
        // `self.hold` holds the slot (module docs of `guard`).
        Ok(unsafe { p.read_volatile() })
    }

    /// Writes the aligned `u64` at `gpa` with one host store.
    ///
    /// # Errors
    /// [`GuardError::ReadOnly`], [`GuardError::Unaligned`], [`GuardError::OutOfSlot`].
    #[inline]
    pub fn write_u64(&self, gpa: Gpa, value: u64) -> Result<(), GuardError> {
        if self.flags.read_only {
            return Err(GuardError::ReadOnly {
                gpa,
                slot: self.slot_id(),
            });
        }
        let p = self.word_ptr(gpa)?;
        // SAFETY: as in `read_u64`; the mapping is writable (every backing is
        // mapped read-write; read-only is a guest-side memslot flag).
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`GuardError::OutOfSlot`].
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), GuardError> {
        let p = self.hva(gpa, buf.len() as u64)?.0 as *const u8;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `i < len` and `[p, p + len)` lies inside the slot's
            // mapped host memory while the guard lives.
            *b = unsafe { p.add(i).read_volatile() };
        }
        Ok(())
    }

    /// Copies `buf` to `gpa`.
    ///
    /// # Errors
    /// [`GuardError::ReadOnly`], [`GuardError::OutOfSlot`].
    pub fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), GuardError> {
        if self.flags.read_only {
            return Err(GuardError::ReadOnly {
                gpa,
                slot: self.slot_id(),
            });
        }
        let p = self.hva(gpa, buf.len() as u64)?.0 as *mut u8;
        for (i, b) in buf.iter().enumerate() {
            // SAFETY: as in `read`; the mapping is writable.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// `[gpa, gpa + len)` as a vm-memory [`VolatileSlice`] for reading. The
    /// slice borrows the guard: the memory stays mapped for its lifetime.
    /// The slice type can write too: writers take
    /// [`slice_for_write`](Self::slice_for_write), which refuses read-only
    /// slots.
    ///
    /// # Errors
    /// [`GuardError::OutOfSlot`].
    pub fn slice(&self, gpa: Gpa, len: u64) -> Result<VolatileSlice<'_>, GuardError> {
        let hva = self.hva(gpa, len)?;
        let len = usize::try_from(len).map_err(|_| GuardError::OutOfSlot {
            gpa,
            len,
            slot: self.slot_id(),
        })?;
        // SAFETY: `[hva, hva + len)` lies inside the slot (checked by `hva`),
        // whose host memory stays mapped and is not discarded while the guard
        // lives (module docs of `guard`); the slice borrows `self`, so it
        // cannot outlive the guard. Guest memory is shared by design, and
        // `VolatileSlice` only does volatile accesses to it.
        Ok(unsafe { VolatileSlice::new(hva.0 as *mut u8, len) })
    }

    /// As [`slice`](Self::slice), for writing: refuses a read-only slot.
    ///
    /// # Errors
    /// [`GuardError::ReadOnly`], [`GuardError::OutOfSlot`].
    pub fn slice_for_write(&self, gpa: Gpa, len: u64) -> Result<VolatileSlice<'_>, GuardError> {
        if self.flags.read_only {
            return Err(GuardError::ReadOnly {
                gpa,
                slot: self.slot_id(),
            });
        }
        self.slice(gpa, len)
    }
}
