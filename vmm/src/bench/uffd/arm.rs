//! Arming a test range for userfaultfd demand paging: the four modes, the
//! memory each needs before the guest runs, the registration (one uffd for
//! the whole range or one per vCPU part), and re-arming between passes.
//!
//! | mode | memory | registered | the guest faults on | resolved with |
//! |---|---|---|---|---|
//! | zero | private anonymous | MISSING | every first access | `UFFDIO_ZEROPAGE` |
//! | copy | private anonymous | MISSING | every first access | `UFFDIO_COPY` from a memfd holding the FILL pattern |
//! | minor | memfd (shmem), page cache filled through a second mapping | MINOR | every first access (no PTE) | `UFFDIO_CONTINUE` |
//! | wp | private anonymous, populated, then write-protected | WP | writes only | `UFFDIO_WRITEPROTECT` (un-protect, wakes) |
//!
//! The features a mode needs are checked against the kernel's `UFFDIO_API`
//! handshake first; a missing one is refused with its name
//! ([`UffdError::Unsupported`]).

use std::os::fd::{AsRawFd, OwnedFd};

use guest_image::protocol::pattern_word;

use super::sys;
use super::UffdError;
use crate::bench::config::{Backing, TEST_BASE};
use crate::mm::addr::PAGE_SIZE;
use crate::mm::backing::{BackingKind, HostMapping};

/// How a mode's faults arise and are resolved (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum Mode {
    /// MISSING faults resolved with `UFFDIO_ZEROPAGE`.
    Zero,
    /// MISSING faults resolved with `UFFDIO_COPY`.
    Copy,
    /// MINOR faults on shmem resolved with `UFFDIO_CONTINUE`.
    Minor,
    /// Write-protect faults resolved by un-protecting.
    Wp,
}

impl Mode {
    /// The mode of a uffd backing; `None` for the others.
    pub fn of(backing: &Backing) -> Option<Mode> {
        match backing {
            Backing::UffdZero => Some(Mode::Zero),
            Backing::UffdCopy => Some(Mode::Copy),
            Backing::UffdMinor => Some(Mode::Minor),
            Backing::UffdWp => Some(Mode::Wp),
            _ => None,
        }
    }

    /// The host memory the mode needs.
    pub fn host_kind(self) -> BackingKind {
        match self {
            Mode::Minor => BackingKind::Memfd,
            _ => BackingKind::Anon,
        }
    }

    fn register_mode(self) -> u64 {
        match self {
            Mode::Zero | Mode::Copy => sys::MODE_MISSING,
            Mode::Minor => sys::MODE_MINOR,
            Mode::Wp => sys::MODE_WP,
        }
    }

    /// The features the mode cannot work without, with their names.
    fn required(self) -> &'static [(u64, &'static str)] {
        match self {
            Mode::Zero | Mode::Copy => &[],
            Mode::Minor => &[(sys::FEATURE_MINOR_SHMEM, "UFFD_FEATURE_MINOR_SHMEM")],
            Mode::Wp => &[(
                sys::FEATURE_PAGEFAULT_FLAG_WP,
                "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
            )],
        }
    }

    /// Whether the guest content is the FILL pattern of the seed after the
    /// fault (so a guest VERIFY can check it).
    pub fn has_pattern(self) -> bool {
        matches!(self, Mode::Copy | Mode::Minor)
    }
}

/// One registered userfaultfd and its range (host addresses).
#[derive(Debug)]
pub struct Registered {
    /// The descriptor (non-blocking).
    pub fd: OwnedFd,
    /// First byte of the range.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

impl Registered {
    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr - self.start < self.len
    }
}

/// A test range armed for one mode.
#[derive(Debug)]
pub struct Armed {
    /// The mode.
    pub mode: Mode,
    /// One uffd for the whole range, or one per vCPU part.
    pub uffds: Vec<Registered>,
    /// Host address of the range.
    pub base: u64,
    /// Bytes of the range.
    pub len: u64,
    /// The copy source, same offsets as the range (copy mode only).
    source: Option<HostMapping>,
}

/// Writes the FILL pattern of `seed` for guest addresses from [`TEST_BASE`]
/// over `len` bytes at `ptr`.
///
/// # Safety
/// `ptr..ptr + len` must be writable memory nobody else accesses meanwhile.
unsafe fn fill_pattern(ptr: *mut u8, len: u64, seed: u64) {
    // SAFETY: the caller guarantees the range is ours to write; u64 stores
    // go through unaligned writes, so the pointer needs no alignment.
    unsafe {
        for word in 0..len / 8 {
            let v = pattern_word(seed, TEST_BASE + word * 8);
            std::ptr::write_unaligned(ptr.add((word * 8) as usize).cast::<u64>(), v.to_le());
        }
    }
}

/// A second shared mapping of a memfd: the page cache the guest will MINOR
/// fault on is filled through it, so the guest's mapping stays without PTEs.
fn fill_page_cache(test: &HostMapping, seed: u64) -> Result<(), UffdError> {
    let fd = test
        .fd()
        .ok_or(UffdError::Setup("uffd-minor needs a memfd mapping"))?;
    let len = test.len() as usize;
    // SAFETY: a fresh shared mapping of the memfd at a kernel-chosen
    // address; no existing memory is affected; checked against MAP_FAILED.
    let second = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if second == libc::MAP_FAILED {
        return Err(UffdError::sys("mmap of the memfd's second view")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `second` is our own fresh `len`-byte writable mapping.
    unsafe { fill_pattern(second.cast(), len as u64, seed) };
    // SAFETY: unmapping exactly the mapping created above, no longer used.
    unsafe { libc::munmap(second, len) };
    Ok(())
}

impl Armed {
    /// Prepares `test` for `mode` and registers it: the whole range with one
    /// uffd, or with one uffd per part of `parts` (offsets into `test`).
    /// `seed` gives copy and minor their content (the FILL pattern at each
    /// word's guest address). `thread_ids`: ask for the faulting thread's id
    /// in each message when the kernel offers it.
    pub fn new(
        mode: Mode,
        test: &HostMapping,
        parts: &[(u64, u64)],
        seed: u64,
        thread_ids: bool,
    ) -> Result<Self, UffdError> {
        let offered = sys::supported_features().map_err(UffdError::sys("UFFDIO_API"))?;
        for &(bit, name) in mode.required() {
            if offered & bit == 0 {
                return Err(UffdError::Unsupported {
                    mode,
                    feature: name,
                });
            }
        }
        let thread_ids = thread_ids && offered & sys::FEATURE_THREAD_ID != 0;
        let mut features = mode.required().iter().fold(0, |f, &(bit, _)| f | bit);
        if thread_ids {
            features |= sys::FEATURE_THREAD_ID;
        }
        let source = match mode {
            Mode::Copy => {
                let src = HostMapping::new(&BackingKind::Memfd, test.len())?;
                // SAFETY: our own fresh mapping of `len` bytes.
                unsafe { fill_pattern(src.as_ptr(), src.len(), seed) };
                Some(src)
            }
            Mode::Minor => {
                fill_page_cache(test, seed)?;
                None
            }
            Mode::Wp => {
                test.populate();
                None
            }
            Mode::Zero => None,
        };
        let base = test.hva().0;
        let mut uffds = Vec::with_capacity(parts.len());
        for &(off, len) in parts {
            let fd = sys::open(features).map_err(UffdError::sys("userfaultfd + UFFDIO_API"))?;
            let start = base + off;
            sys::register(fd.as_raw_fd(), start, len, mode.register_mode())
                .map_err(UffdError::sys("UFFDIO_REGISTER"))?;
            uffds.push(Registered { fd, start, len });
        }
        let armed = Self {
            mode,
            uffds,
            base,
            len: test.len(),
            source,
        };
        if mode == Mode::Wp {
            armed.protect()?;
        }
        Ok(armed)
    }

    /// Write-protects every registered range (wp mode).
    fn protect(&self) -> Result<(), UffdError> {
        for u in &self.uffds {
            sys::writeprotect(u.fd.as_raw_fd(), u.start, u.len, true)
                .map_err(UffdError::sys("UFFDIO_WRITEPROTECT (protect)"))?;
        }
        Ok(())
    }

    /// Host address of the copy source of the page at `addr` (copy mode).
    pub fn source_of(&self, addr: u64) -> Option<u64> {
        self.source.as_ref().map(|s| s.hva().0 + (addr - self.base))
    }

    /// Copies the copy source's bytes at offsets `[off, off + len)` into the
    /// same offsets of the range with `UFFDIO_COPY`, several pages per call
    /// (a batched prefetch: one call per registered uffd the run crosses),
    /// waking any thread waiting on those pages. Copy mode only; `off` and
    /// `len` must be page-aligned and inside the range. Returns the bytes
    /// copied.
    pub fn copy(&self, off: u64, len: u64) -> Result<u64, UffdError> {
        let Some(src) = self.source_of(self.base) else {
            return Err(UffdError::Setup(
                "a batched UFFDIO_COPY needs uffd-copy (the other modes have no copy source)",
            ));
        };
        let end = off.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() || off % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(UffdError::OutOfRange {
                addr: self.base.wrapping_add(off),
                start: self.base,
                len: self.len,
            });
        }
        let (lo, hi) = (self.base + off, self.base + off + len);
        let mut copied = 0;
        for u in &self.uffds {
            let (a, b) = (lo.max(u.start), hi.min(u.start + u.len));
            if a >= b {
                continue;
            }
            sys::copy(u.fd.as_raw_fd(), a, src + (a - self.base), b - a)
                .map_err(UffdError::sys("UFFDIO_COPY (prefetch)"))?;
            copied += b - a;
        }
        Ok(copied)
    }

    /// The one resolving ioctl of the mode for the page at `addr`, on the
    /// uffd `fd` whose range holds it.
    pub fn resolve(&self, fd: i32, addr: u64) -> std::io::Result<()> {
        match self.mode {
            Mode::Zero => sys::zeropage(fd, addr, PAGE_SIZE),
            Mode::Copy => {
                let src = self.source_of(addr).expect("copy mode has a source");
                sys::copy(fd, addr, src, PAGE_SIZE)
            }
            Mode::Minor => sys::continue_(fd, addr, PAGE_SIZE),
            Mode::Wp => sys::writeprotect(fd, addr, PAGE_SIZE, false),
        }
    }

    /// Makes the next pass fault again (vCPUs parked): zero and copy drop
    /// the pages (`MADV_DONTNEED`: missing again), minor drops the PTEs but
    /// keeps the page cache, wp protects the range again. Each goes through
    /// the mmu notifier, so KVM zaps its mappings too.
    pub fn rearm(&self) -> Result<(), UffdError> {
        match self.mode {
            Mode::Zero | Mode::Copy | Mode::Minor => {
                sys::dontneed(self.base, self.len).map_err(UffdError::sys("madvise(DONTNEED)"))
            }
            Mode::Wp => self.protect(),
        }
    }
}
