//! userfaultfd demand paging for the test range, handled in-process.
//!
//! [`Userfault::register`] opens a userfaultfd with the raw syscall
//! (`O_NONBLOCK | O_CLOEXEC`, never `UFFD_USER_MODE_ONLY`: KVM faults on guest
//! memory in kernel mode, through get_user_pages) and registers a range in
//! MISSING mode. [`Handler::spawn`] starts a thread that polls the fd and
//! resolves each missing page with `UFFDIO_ZEROPAGE` or `UFFDIO_COPY` from a
//! source file, recording every page it resolved.
//!
//! The ioctl numbers and structures are written out from
//! `include/uapi/linux/userfaultfd.h` (no bindgen).
//!
//! Why not the `userfaultfd` crate: its bindgen build needs libclang on every
//! developer's and CI's machine for the five ioctls used here.
//!
//! Concurrency: the handler thread owns the fd's reads; the resolved-page
//! list sits behind a mutex that the handler holds across each resolution
//! (the faulting thread wakes inside the ioctl), so whoever saw a fault
//! complete and then calls [`Handler::take_resolved`] finds its page listed.
//! It is the only lock. Stopping writes an eventfd the handler polls
//! with the uffd, so it never blocks in `read`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mm::addr::PAGE_SIZE;

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOC(dir, 0xAA, nr, size)`.
const fn uffd_ioc(dir: u64, nr: u64, size: u64) -> libc::c_ulong {
    ((dir << 30) | (size << 16) | (0xAA << 8) | nr) as libc::c_ulong
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;
const UFFDIO_API: libc::c_ulong = uffd_ioc(IOC_RW, 0x3F, 24);
const UFFDIO_REGISTER: libc::c_ulong = uffd_ioc(IOC_RW, 0x00, 32);
const UFFDIO_WAKE: libc::c_ulong = uffd_ioc(IOC_READ, 0x02, 16);
const UFFDIO_COPY: libc::c_ulong = uffd_ioc(IOC_RW, 0x03, 40);
const UFFDIO_ZEROPAGE: libc::c_ulong = uffd_ioc(IOC_RW, 0x04, 32);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): event byte, then for a page fault the flags
/// at offset 8 and the address at offset 16.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// Errors of the userfaultfd handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A system call failed.
    #[error("userfaultfd: {what} failed: {source}")]
    Sys {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the copy source failed.
    #[error("userfaultfd: reading the copy source at offset {offset:#x}: {source}")]
    Source {
        /// Offset into the source.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// A fault outside the registered range.
    #[error(
        "userfaultfd: fault at {addr:#x} outside the registered range [{start:#x}, +{len:#x})"
    )]
    OutOfRange {
        /// Faulting address.
        addr: u64,
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
    },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> UffdError {
    move |source| UffdError::Sys { what, source }
}

/// A userfaultfd with one range registered in MISSING mode.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    start: u64,
    len: u64,
}

impl Userfault {
    /// Opens a userfaultfd and registers `[start, start + len)` (page-aligned
    /// host addresses of a private anonymous mapping) in MISSING mode.
    pub fn register(start: u64, len: u64) -> Result<Self, UffdError> {
        // SAFETY: the userfaultfd syscall takes only flags and returns a new
        // fd or -1; no memory is passed.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(sys("userfaultfd(O_CLOEXEC|O_NONBLOCK)")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` is (repr(C), 24 bytes), valid for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(sys("UFFDIO_API")(io::Error::last_os_error()));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`;
        // the kernel validates the range (it must be mapped by the caller).
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(sys("UFFDIO_REGISTER")(io::Error::last_os_error()));
        }
        Ok(Self { fd, start, len })
    }

    /// Copies `src` to host address `dst` with one `UFFDIO_COPY` (several
    /// pages in one call: a batched prefetch), waking any thread waiting on
    /// those pages. `dst` and `src.len()` must be page-aligned and inside
    /// the registered range; returns the bytes copied.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<u64, UffdError> {
        let len = src.len() as u64;
        if dst < self.start || dst + len > self.start + self.len {
            return Err(UffdError::OutOfRange {
                addr: dst,
                start: self.start,
                len: self.len,
            });
        }
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (a live slice of
        // that length) and writes the `copy` field of `c`, a repr(C)
        // `struct uffdio_copy`; the destination is inside the range we
        // registered (checked above), which the kernel validates again.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) } != 0 {
            return Err(sys("UFFDIO_COPY (prefetch)")(io::Error::last_os_error()));
        }
        Ok(c.copy.max(0) as u64)
    }
}

/// How the handler resolves a missing page.
#[derive(Debug)]
pub enum Resolve {
    /// `UFFDIO_ZEROPAGE`.
    Zero,
    /// `UFFDIO_COPY` from this file, at the page's offset in the range.
    CopyFrom(File),
}

/// What the handler did, per pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UffdCounts {
    /// Fault messages read.
    pub faults: u64,
    /// Pages resolved (copied or zero-filled).
    pub resolved: u64,
    /// Faults on pages another message already resolved (woken with UFFDIO_WAKE).
    pub already_present: u64,
}

#[derive(Debug, Default)]
struct Shared {
    resolved: Vec<u64>,
    counts: UffdCounts,
    error: Option<String>,
}

/// The handler thread; stops and joins on drop.
#[derive(Debug)]
pub struct Handler {
    stop: EventFd,
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
}

impl Handler {
    /// Starts the handler thread for `uffd`, pinned to `cpu` if given.
    pub fn spawn(uffd: Userfault, resolve: Resolve, cpu: Option<usize>) -> Result<Self, UffdError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(sys("eventfd"))?;
        let stop_rx = stop.try_clone().map_err(sys("eventfd dup"))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let st = shared.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    super::host::pin_current_thread(cpu);
                }
                let page = vec![0u8; PAGE_SIZE as usize];
                if let Err(e) = serve(&uffd, &resolve, &stop_rx, &st, page) {
                    lock(&st).error = Some(e.to_string());
                }
            })
            .map_err(sys("spawning the handler thread"))?;
        Ok(Self {
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// Pages resolved since the last call (host addresses, in resolution
    /// order) and the counters, reset to zero; or the handler's error.
    pub fn take_resolved(&self) -> Result<(Vec<u64>, UffdCounts), String> {
        let mut st = lock(&self.shared);
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        Ok((
            std::mem::take(&mut st.resolved),
            std::mem::take(&mut st.counts),
        ))
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // The handler never panics while holding the lock; a poisoned lock still
    // holds consistent counters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(
    uffd: &Userfault,
    resolve: &Resolve,
    stop: &EventFd,
    shared: &Mutex<Shared>,
    mut page: Vec<u8>,
) -> Result<(), UffdError> {
    let fd = uffd.fd.as_raw_fd();
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys("poll")(e));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents == 0 {
            continue;
        }
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
        // SAFETY: reads at most one 32-byte message into `msg`, which has
        // room for it; the fd is non-blocking.
        let got = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys("read")(e));
        }
        if got != 32 {
            continue;
        }
        // SAFETY: the kernel wrote a whole `struct uffd_msg` (32 bytes).
        let msg = unsafe { msg.assume_init() };
        if msg.event != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let addr = msg.address & !(PAGE_SIZE - 1);
        if addr < uffd.start || addr >= uffd.start + uffd.len {
            return Err(UffdError::OutOfRange {
                addr: msg.address,
                start: uffd.start,
                len: uffd.len,
            });
        }
        // Hold the lock across the resolution: the faulting thread wakes
        // inside the ioctl, and a reader that saw it finish must then find
        // this page in the list.
        let mut st = lock(shared);
        let resolved = resolve_page(fd, addr, addr - uffd.start, resolve, &mut page)?;
        st.counts.faults += 1;
        if resolved {
            st.counts.resolved += 1;
            st.resolved.push(addr);
        } else {
            st.counts.already_present += 1;
        }
    }
}

/// Resolves the page at `addr`; `false` if it was already present (EEXIST),
/// in which case the waiters are woken explicitly.
fn resolve_page(
    fd: i32,
    addr: u64,
    offset: u64,
    resolve: &Resolve,
    page: &mut [u8],
) -> Result<bool, UffdError> {
    let (ret, what) = match resolve {
        Resolve::Zero => {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: addr,
                    len: PAGE_SIZE,
                },
                ..Default::default()
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct
            // uffdio_zeropage`; the range is a page of the registered range.
            (
                unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut z) },
                "UFFDIO_ZEROPAGE",
            )
        }
        Resolve::CopyFrom(file) => {
            file.read_exact_at(page, offset)
                .map_err(|source| UffdError::Source { offset, source })?;
            let mut c = UffdioCopy {
                dst: addr,
                src: page.as_ptr() as u64,
                len: PAGE_SIZE,
                ..Default::default()
            };
            // SAFETY: UFFDIO_COPY reads `page` (PAGE_SIZE bytes, alive for the
            // call) into the missing page at `addr` of the registered range.
            (
                unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut c) },
                "UFFDIO_COPY",
            )
        }
    };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        let mut r = UffdioRange {
            start: addr,
            len: PAGE_SIZE,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range` of the registered range.
        if unsafe { libc::ioctl(fd, UFFDIO_WAKE, &mut r) } != 0 {
            return Err(sys("UFFDIO_WAKE")(io::Error::last_os_error()));
        }
        return Ok(false);
    }
    Err(sys(what)(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::backing::{BackingKind, HostMapping};

    #[test]
    fn test_uffd_zero_resolves_exactly_the_touched_pages() {
        let m = HostMapping::new(&BackingKind::Anon, 16 * PAGE_SIZE).unwrap();
        let uffd = Userfault::register(m.hva().0, m.len()).unwrap();
        let h = Handler::spawn(uffd, Resolve::Zero, None).unwrap();
        for page in [1u64, 5, 9] {
            // SAFETY: inside the 16-page mapping; the handler resolves it.
            let v = unsafe { std::ptr::read_volatile(m.as_ptr().add((page * PAGE_SIZE) as usize)) };
            assert_eq!(v, 0);
        }
        let (pages, counts) = h.take_resolved().unwrap();
        let expect: Vec<u64> = [1u64, 5, 9]
            .iter()
            .map(|p| m.hva().0 + p * PAGE_SIZE)
            .collect();
        assert_eq!(pages, expect);
        assert_eq!(counts.resolved, 3);
    }

    #[test]
    fn test_uffd_copy_fills_pages_from_the_source() {
        let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / 7) as u8).collect();
        let source = HostMapping::new(&BackingKind::Memfd, 4 * PAGE_SIZE).unwrap();
        let file = File::from(source.fd().unwrap().try_clone().unwrap());
        file.write_all_at(&data, 0).unwrap();
        let m = HostMapping::new(&BackingKind::Anon, 4 * PAGE_SIZE).unwrap();
        let uffd = Userfault::register(m.hva().0, m.len()).unwrap();
        let h = Handler::spawn(uffd, Resolve::CopyFrom(file), None).unwrap();
        let at = 2 * PAGE_SIZE as usize + 123;
        // SAFETY: inside the 4-page mapping.
        let v = unsafe { std::ptr::read_volatile(m.as_ptr().add(at)) };
        assert_eq!(v, data[at]);
        assert_eq!(h.take_resolved().unwrap().1.resolved, 1);
    }
}
