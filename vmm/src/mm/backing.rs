//! Host memory behind guest memory: one [`HostMapping`] owns one `mmap` of a
//! chosen [`BackingKind`] and unmaps it on drop.
//!
//! Ownership rule: whoever registers a mapping with KVM (or any other table that
//! hands out pointers into it) keeps an `Arc<HostMapping>` until that table has
//! dropped the registration, so the memory cannot be unmapped under a user.
//!
//! [`BackingKind`] parses by hand (not with a strum derive): `file=PATH`
//! carries data.
//!
//! ```
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! let m = HostMapping::new(&BackingKind::Anon, 2 << 20).unwrap();
//! assert_eq!(m.len(), 2 << 20);
//! assert_eq!(m.page_size(), 4096);
//! // Fresh anonymous memory reads as zeros.
//! // SAFETY: the mapping is 2 MiB long and alive.
//! assert_eq!(unsafe { *m.as_ptr().add(4096) }, 0);
//! assert!("bogus".parse::<BackingKind>().is_err());
//! ```

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::addr::{Hva, HUGE_2M, PAGE_SIZE};

/// Errors creating or changing a host mapping.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The `--backing` text is not one of the accepted forms.
    #[error("unknown backing {0:?}: expected anon, shared, memfd, thp, hugetlb or file=PATH")]
    UnknownKind(String),
    /// Size zero or not a multiple of the backing's page size.
    #[error("size {size:#x} is not a non-zero multiple of the {kind} page size {page_size:#x}")]
    BadSize {
        /// Requested size.
        size: u64,
        /// Backing kind.
        kind: BackingKind,
        /// Its page size.
        page_size: u64,
    },
    /// hugetlb backing without enough reserved huge pages on the host.
    #[error("hugetlb backing needs {needed} free 2 MiB huge pages but the host has {free} (reserve them with: echo N > /proc/sys/vm/nr_hugepages)")]
    NoHugePages {
        /// Huge pages needed.
        needed: u64,
        /// Huge pages free.
        free: u64,
    },
    /// A `file=PATH` backing that is not an existing regular file large
    /// enough: nothing is created or extended behind the user's back.
    #[error(
        "backing file {path:?} {problem} (create it first, e.g. `truncate -s {size} {path:?}`)"
    )]
    BadFile {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// Bytes the guest memory needs.
        size: u64,
    },
    /// A system call failed.
    #[error("{what} failed for {kind} backing of {size:#x} bytes: {source}")]
    Sys {
        /// The call.
        what: &'static str,
        /// Backing kind.
        kind: BackingKind,
        /// Requested size.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// A discard range outside the mapping or not page-aligned.
    #[error(
        "discard of [{offset:#x}, +{len:#x}) is outside the {size:#x}-byte mapping or misaligned"
    )]
    BadRange {
        /// Offset into the mapping.
        offset: u64,
        /// Length.
        len: u64,
        /// Mapping size.
        size: u64,
    },
}

/// What kind of host memory backs guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anon,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, shmem).
    Shared,
    /// A `memfd_create` file mapped shared.
    Memfd,
    /// Private anonymous memory, 2 MiB aligned, with `MADV_HUGEPAGE`.
    Thp,
    /// `MAP_HUGETLB` 2 MiB pages (needs pages reserved on the host).
    Hugetlb,
    /// A file mapped shared; created if missing and grown to the size needed.
    File(PathBuf),
}

impl BackingKind {
    /// The granule guest ranges on this backing must be aligned to.
    pub fn page_size(&self) -> u64 {
        match self {
            BackingKind::Thp | BackingKind::Hugetlb => HUGE_2M,
            _ => PAGE_SIZE,
        }
    }

    /// The granule guest ranges on this backing are cut, placed and released
    /// at (see [`HostMapping::granule`]).
    pub fn granule(&self) -> u64 {
        match self {
            BackingKind::Thp if crate::mutants::on("thp-cut-2m") => HUGE_2M,
            BackingKind::Hugetlb => HUGE_2M,
            _ => PAGE_SIZE,
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingKind::Anon => f.write_str("anon"),
            BackingKind::Shared => f.write_str("shared"),
            BackingKind::Memfd => f.write_str("memfd"),
            BackingKind::Thp => f.write_str("thp"),
            BackingKind::Hugetlb => f.write_str("hugetlb"),
            BackingKind::File(p) => write!(f, "file={}", p.display()),
        }
    }
}

impl FromStr for BackingKind {
    type Err = BackingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "anon" => BackingKind::Anon,
            "shared" => BackingKind::Shared,
            "memfd" => BackingKind::Memfd,
            "thp" => BackingKind::Thp,
            "hugetlb" => BackingKind::Hugetlb,
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => BackingKind::File(PathBuf::from(p)),
                _ => return Err(BackingError::UnknownKind(s.to_string())),
            },
        })
    }
}

/// [`HostMapping`]s alive in the process.
static LIVE_MAPPINGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One host `mmap` that backs guest memory. Unmapped on drop.
pub struct HostMapping {
    addr: *mut u8,
    len: u64,
    kind: BackingKind,
    /// Keeps a memfd or file open for `discard` (hole punching).
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain memory shared by design between the VMM's
// threads and the guest; `HostMapping` hands out raw pointers only, and every
// dereference of them is an `unsafe` site with its own justification.
unsafe impl Send for HostMapping {}
// SAFETY: as for `Send`: no method takes `&self` and mutates Rust-visible state.
unsafe impl Sync for HostMapping {}

impl fmt::Debug for HostMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMapping")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The number of a `/proc/meminfo` line (`key` without the colon, e.g.
/// `HugePages_Free`), in the file's own unit; `None` if absent.
pub fn meminfo(key: &str) -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free").unwrap_or(0)
}

impl HostMapping {
    /// Maps `len` bytes of `kind` memory, readable and writable.
    pub fn new(kind: &BackingKind, len: u64) -> Result<Self, BackingError> {
        let page_size = kind.page_size();
        if len == 0 || len % page_size != 0 {
            return Err(BackingError::BadSize {
                size: len,
                kind: kind.clone(),
                page_size,
            });
        }
        let sys = |what, source| BackingError::Sys {
            what,
            kind: kind.clone(),
            size: len,
            source,
        };
        if *kind == BackingKind::Hugetlb {
            let (needed, free) = (len / HUGE_2M, free_huge_pages());
            if free < needed {
                return Err(BackingError::NoHugePages { needed, free });
            }
        }
        let fd = match kind {
            BackingKind::Memfd => {
                // SAFETY: the name is a valid NUL-terminated string; the result
                // is checked before use.
                let raw = unsafe { libc::memfd_create(c"vmm-guest".as_ptr(), libc::MFD_CLOEXEC) };
                if raw < 0 {
                    return Err(sys("memfd_create", io::Error::last_os_error()));
                }
                // SAFETY: `raw` is a fresh descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let file = std::fs::File::from(fd);
                file.set_len(len).map_err(|e| sys("ftruncate", e))?;
                Some(OwnedFd::from(file))
            }
            BackingKind::File(path) => Some(OwnedFd::from(open_backing_file(path, len)?)),
            _ => None,
        };
        let (flags, map_len) = match kind {
            BackingKind::Anon => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, len),
            BackingKind::Shared => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, len),
            BackingKind::Memfd | BackingKind::File(_) => (libc::MAP_SHARED, len),
            // Over-allocate so a 2 MiB-aligned window fits; the slop is unmapped.
            BackingKind::Thp => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                len.checked_add(HUGE_2M).ok_or(BackingError::BadSize {
                    size: len,
                    kind: kind.clone(),
                    page_size: HUGE_2M,
                })?,
            ),
            BackingKind::Hugetlb => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                len,
            ),
        };
        let raw_fd = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory
        // is affected. The result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                raw_fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(sys("mmap", io::Error::last_os_error()));
        }
        let mut addr = base.cast::<u8>();
        if *kind == BackingKind::Thp {
            let start = base as u64;
            let aligned = (start + HUGE_2M - 1) & !(HUGE_2M - 1);
            let head = aligned - start;
            let tail = map_len - head - len;
            // SAFETY: both ranges lie inside the mapping just created and are
            // outside the window we keep; nothing references them.
            unsafe {
                if head > 0 {
                    libc::munmap(base, head as usize);
                }
                if tail > 0 {
                    libc::munmap((aligned + len) as *mut libc::c_void, tail as usize);
                }
            }
            addr = aligned as *mut u8;
            // SAFETY: advice on our own mapping; it cannot invalidate memory.
            if unsafe { libc::madvise(addr.cast(), len as usize, libc::MADV_HUGEPAGE) } != 0 {
                let err = io::Error::last_os_error();
                // SAFETY: unmapping the window we own, not yet shared with anyone.
                unsafe { libc::munmap(addr.cast(), len as usize) };
                return Err(sys("madvise(MADV_HUGEPAGE)", err));
            }
        }
        LIVE_MAPPINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            addr,
            len,
            kind: kind.clone(),
            fd,
        })
    }

    /// Host mappings alive in this process now (made and not yet dropped):
    /// what the fuzzer's leak check compares before and after each VM.
    pub fn live_count() -> usize {
        LIVE_MAPPINGS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Maps `len` bytes of a shared file that has no name: created in `dir`
    /// with `O_TMPFILE` (or, where the file system lacks it, unlinked right
    /// after creation), so nothing is left in `dir`, even after `SIGKILL`.
    pub fn new_unnamed_file(dir: &Path, len: u64) -> Result<Self, BackingError> {
        let kind = BackingKind::File(dir.join("(unnamed)"));
        let file = unnamed_file(dir).map_err(|source| BackingError::Sys {
            what: "open(O_TMPFILE)",
            kind: kind.clone(),
            size: len,
            source,
        })?;
        file.set_len(len).map_err(|source| BackingError::Sys {
            what: "ftruncate",
            kind: kind.clone(),
            size: len,
            source,
        })?;
        // The mapping opens its own descriptor of the same unnamed file.
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let mut m = Self::new(&BackingKind::File(by_fd), len)?;
        m.kind = kind;
        Ok(m)
    }

    /// Populates every page for writing (`MADV_POPULATE_WRITE`, or a write to
    /// each page on kernels without it), so later accesses find them present.
    pub fn populate(&self) {
        const MADV_POPULATE_WRITE: i32 = 23;
        // SAFETY: advice on our own live mapping; it only faults pages in.
        let ok =
            unsafe { libc::madvise(self.addr.cast(), self.len as usize, MADV_POPULATE_WRITE) } == 0;
        if !ok {
            for off in (0..self.len).step_by(PAGE_SIZE as usize) {
                // SAFETY: `off` < len; the mapping is alive and ours.
                unsafe { std::ptr::write_volatile(self.addr.add(off as usize), 0) };
            }
        }
    }

    /// Populates `[offset, offset + len)` for writing with
    /// `MADV_POPULATE_WRITE` (Linux 5.14+) alone: unlike
    /// [`populate`](Self::populate) it does not fall back to touching, so a
    /// kernel without it is an error, not a silent change of method.
    pub fn populate_write(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        const MADV_POPULATE_WRITE: i32 = 23;
        self.check_range(offset, len, PAGE_SIZE)?;
        // SAFETY: the range lies inside our live mapping (checked above);
        // the advice only faults its pages in for writing.
        let rc = unsafe {
            libc::madvise(
                self.addr.add(offset as usize).cast(),
                len as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(BackingError::Sys {
                what: "madvise(MADV_POPULATE_WRITE)",
                kind: self.kind.clone(),
                size: len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Writes one zero byte to every 4 KiB page of `[offset, offset + len)`
    /// from this thread: the touch prefault, one host fault per page.
    pub fn touch_pages(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.check_range(offset, len, PAGE_SIZE)?;
        for off in (offset..offset + len).step_by(PAGE_SIZE as usize) {
            // SAFETY: `off` < offset + len <= self.len (checked); the mapping
            // is alive and ours; a zero byte is what fresh memory holds.
            unsafe { std::ptr::write_volatile(self.addr.add(off as usize), 0) };
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64, align: u64) -> Result<(), BackingError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) || offset % align != 0 || len % align != 0 {
            return Err(BackingError::BadRange {
                offset,
                len,
                size: self.len,
            });
        }
        Ok(())
    }

    /// Host address of the first byte.
    pub fn hva(&self) -> Hva {
        Hva(self.addr as u64)
    }

    /// Pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never true: zero-size mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing kind.
    pub fn kind(&self) -> &BackingKind {
        &self.kind
    }

    /// The size of the pages the host maps it with (2 MiB for THP and
    /// hugetlb): its length is a multiple of it.
    pub fn page_size(&self) -> u64 {
        self.kind.page_size()
    }

    /// The granule guest ranges on this mapping are cut, placed and released
    /// at: 2 MiB for hugetlb (the kernel cannot split a hugetlb page), 4 KiB
    /// for everything else, THP included (Linux splits a transparent huge
    /// page at 4 KiB, and KVM and the IOMMU then map that 2 MiB region with
    /// 4 KiB pages by themselves).
    pub fn granule(&self) -> u64 {
        self.kind.granule()
    }

    /// The `mmap` flags, for wrappers (vm-memory) that need them.
    pub fn mmap_flags(&self) -> i32 {
        match self.kind {
            BackingKind::Anon | BackingKind::Thp => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            BackingKind::Hugetlb => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            BackingKind::Shared => libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            BackingKind::Memfd | BackingKind::File(_) => libc::MAP_SHARED,
        }
    }

    /// Releases the host memory of `[offset, offset + len)`: the next access
    /// reads zeros (files: the file's contents are punched out too).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        let ps = self.granule();
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) || offset % ps != 0 || len % ps != 0 {
            return Err(BackingError::BadRange {
                offset,
                len,
                size: self.len,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let sys = |what, source| BackingError::Sys {
            what,
            kind: self.kind.clone(),
            size: len,
            source,
        };
        // SAFETY: the range lies inside our mapping (checked above); discarding
        // replaces its contents with zeros, which every user of guest memory
        // must tolerate (callers invalidate users first).
        let ptr = unsafe { self.addr.add(offset as usize) };
        // Private mappings drop their pages with MADV_DONTNEED (hugetlb too,
        // since Linux 5.18); shared ones need MADV_REMOVE to free the backing
        // pages (MADV_REMOVE on a private mapping fails with EACCES).
        let advice = match self.kind {
            BackingKind::Anon | BackingKind::Thp | BackingKind::Hugetlb => libc::MADV_DONTNEED,
            _ => libc::MADV_REMOVE,
        };
        // SAFETY: see above; `ptr..ptr+len` is inside the mapping.
        if unsafe { libc::madvise(ptr.cast(), len as usize, advice) } != 0 {
            return Err(sys("madvise(discard)", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The descriptor of a memfd or file backing.
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }
}

/// A file in `dir` without a name: `O_TMPFILE`, else created and unlinked.
/// Opens `path` read-write for a `file=PATH` backing of `len` bytes: it must
/// be an existing regular file of at least `len` bytes. Nothing is created or
/// extended: a file the user did not ask for is never left behind.
///
/// # Errors
/// [`BackingError::BadFile`] naming what is wrong.
pub fn open_backing_file(path: &Path, len: u64) -> Result<std::fs::File, BackingError> {
    let bad = |problem: String| BackingError::BadFile {
        path: path.to_path_buf(),
        problem,
        size: len,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot be used: {e}")))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if meta.len() < len {
        return Err(bad(format!(
            "holds {:#x} bytes, less than the {len:#x} bytes of guest memory",
            meta.len()
        )));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| bad(format!("cannot be opened for reading and writing: {e}")))
}

fn unnamed_file(dir: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir);
    match tmpfile {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            let path = dir.join(format!(".vmm-unnamed-{}", std::process::id()));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(file)
        }
        r => r,
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        LIVE_MAPPINGS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: we own this mapping; by the ownership rule above nobody can
        // still hold a registration that points into it.
        let ret = unsafe { libc::munmap(self.addr.cast(), self.len as usize) };
        if ret != 0 {
            // munmap fails only on arguments that were never a mapping of
            // ours (EINVAL): a bug, loud in debug builds, reported otherwise.
            let e = std::io::Error::last_os_error();
            debug_assert!(false, "munmap of {} +{:#x}: {e}", self.hva(), self.len);
            eprintln!("vmm: munmap of {} +{:#x} failed: {e}", self.hva(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_read(m: &HostMapping, off: u64, v: u8) -> u8 {
        // SAFETY: `off` is inside the mapping in every caller.
        unsafe {
            *m.as_ptr().add(off as usize) = v;
            *m.as_ptr().add(off as usize)
        }
    }

    /// Pages of `[off, off + len)` of `m` resident now (`mincore`).
    fn resident(m: &HostMapping, off: u64, len: u64) -> usize {
        let mut vec = vec![0u8; (len / PAGE_SIZE) as usize];
        // SAFETY: the range is inside the live mapping; `vec` has one byte
        // per page of it, which mincore fills.
        let rc = unsafe {
            libc::mincore(
                m.as_ptr().add(off as usize).cast(),
                len as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn test_populate_write_and_touch_fill_exactly_their_range() {
        let m = HostMapping::new(&BackingKind::Anon, 16 * PAGE_SIZE).unwrap();
        assert_eq!(resident(&m, 0, 16 * PAGE_SIZE), 0);
        m.populate_write(4 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(resident(&m, 4 * PAGE_SIZE, 4 * PAGE_SIZE), 4);
        assert_eq!(resident(&m, 0, 16 * PAGE_SIZE), 4);
        m.touch_pages(12 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!(resident(&m, 0, 16 * PAGE_SIZE), 6);
        for bad in [
            (1, PAGE_SIZE),
            (0, 17 * PAGE_SIZE),
            (u64::MAX - 4095, PAGE_SIZE),
        ] {
            assert!(matches!(
                m.populate_write(bad.0, bad.1),
                Err(BackingError::BadRange { .. })
            ));
            assert!(m.touch_pages(bad.0, bad.1).is_err());
        }
        assert_eq!(
            resident(&m, 0, 16 * PAGE_SIZE),
            6,
            "refusals change nothing"
        );
    }

    #[test]
    fn test_backing_parse_all_forms_roundtrip() {
        for s in ["anon", "shared", "memfd", "thp", "hugetlb", "file=/tmp/x"] {
            assert_eq!(s.parse::<BackingKind>().unwrap().to_string(), s);
        }
        let err = "file=".parse::<BackingKind>().unwrap_err().to_string();
        assert!(err.contains("file=PATH"), "{err}");
    }

    #[test]
    fn test_mapping_each_kind_is_usable_and_discard_zeroes() {
        let dir = std::env::temp_dir().join(format!("vmm-backing-{}", std::process::id()));
        std::fs::File::create(&dir)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        for kind in [
            BackingKind::Anon,
            BackingKind::Shared,
            BackingKind::Memfd,
            BackingKind::Thp,
            BackingKind::File(dir.clone()),
        ] {
            let m = HostMapping::new(&kind, 4 << 20).unwrap();
            assert_eq!(write_read(&m, 8192, 7), 7, "{kind}");
            if kind == BackingKind::Thp {
                assert!(m.hva().is_aligned(HUGE_2M));
            }
            let ps = m.page_size();
            m.discard(8192 / ps * ps, ps).unwrap();
            // SAFETY: offset 8192 < 4 MiB.
            assert_eq!(unsafe { *m.as_ptr().add(8192) }, 0, "{kind}");
        }
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn test_mapping_zero_or_misaligned_size_is_rejected() {
        assert!(matches!(
            HostMapping::new(&BackingKind::Anon, 0),
            Err(BackingError::BadSize { .. })
        ));
        assert!(matches!(
            HostMapping::new(&BackingKind::Thp, 4096),
            Err(BackingError::BadSize { .. })
        ));
    }

    #[test]
    fn test_discard_out_of_range_is_rejected() {
        let m = HostMapping::new(&BackingKind::Anon, 8192).unwrap();
        assert!(matches!(
            m.discard(4096, 8192),
            Err(BackingError::BadRange { .. })
        ));
    }

    #[test]
    fn test_hugetlb_without_reserved_pages_names_the_fix() {
        if free_huge_pages() > 0 {
            return; // This host has huge pages; the refusal path does not apply.
        }
        let err = HostMapping::new(&BackingKind::Hugetlb, 2 << 20).unwrap_err();
        assert!(err.to_string().contains("nr_hugepages"), "{err}");
    }

    #[test]
    fn test_meminfo_reads_the_named_line_only() {
        let text = "MemTotal:       24000 kB\nHugePages_Total:       4\nHugePages_Free:        3\n";
        assert_eq!(parse_meminfo(text, "HugePages_Free"), Some(3));
        assert_eq!(parse_meminfo(text, "MemTotal"), Some(24000));
        assert_eq!(parse_meminfo(text, "HugePages"), None);
        assert!(meminfo("MemTotal").is_some());
    }

    #[test]
    fn test_unnamed_file_leaves_nothing_in_its_directory() {
        let dir = std::env::temp_dir().join(format!("vmm-unnamed-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = HostMapping::new_unnamed_file(&dir, 2 * PAGE_SIZE).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(write_read(&m, PAGE_SIZE, 7), 7);
        m.discard(0, 2 * PAGE_SIZE).unwrap();
        drop(m);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn test_file_backing_creates_and_extends_nothing_and_names_the_problem() {
        let dir = std::env::temp_dir().join(format!("vmm-backing-bad-{}", std::process::id()));
        let missing = dir.join("missing.img");
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.img");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let cases = [
            (missing.clone(), "cannot be used"),
            (dir.clone(), "not a regular file"),
            (PathBuf::from("/dev/null"), "not a regular file"),
            (small.clone(), "less than the 0x200000 bytes"),
        ];
        for (path, problem) in cases {
            let err = HostMapping::new(&BackingKind::File(path.clone()), 2 << 20).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(problem) && text.contains("truncate -s"),
                "{path:?}: {text}"
            );
        }
        assert!(!missing.exists(), "a file was created");
        assert_eq!(
            std::fs::metadata(&small).unwrap().len(),
            4096,
            "the file was extended"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Regression: the THP over-allocation (`len + 2 MiB`) overflowed for a
    /// size near 2^64 (a debug-build panic, found by `vmm fuzz`).
    #[test]
    fn test_thp_mapping_of_a_size_near_2_64_is_refused_not_overflowed() {
        let err = HostMapping::new(&BackingKind::Thp, u64::MAX - (HUGE_2M - 1)).unwrap_err();
        assert!(matches!(err, BackingError::BadSize { .. }), "{err}");
    }
}
