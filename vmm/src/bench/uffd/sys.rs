//! The userfaultfd kernel ABI, written out from
//! `include/uapi/linux/userfaultfd.h` (no bindgen), and thin wrappers that
//! turn each ioctl into an `io::Result`. Both the tool's handler and the raw
//! baseline's handler call these: they are the system calls themselves,
//! nothing more.
//!
//! Why not the `userfaultfd` crate: its bindgen build needs libclang on every
//! developer's and CI's machine for the handful of ioctls used here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The API version of `UFFDIO_API`.
const UFFD_API: u64 = 0xAA;

/// `UFFDIO_REGISTER` mode: faults on missing pages.
pub const MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER` mode: faults on writes to write-protected pages.
pub const MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER` mode: faults on pages present in the page cache but not
/// mapped (resolved with `UFFDIO_CONTINUE`).
pub const MODE_MINOR: u64 = 1 << 2;

/// Feature: write-protect faults report `UFFD_PAGEFAULT_FLAG_WP`.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Feature: page-fault messages carry the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// Feature: MINOR mode on shmem (memfd, `MAP_SHARED|MAP_ANONYMOUS`).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// `uffd_msg.event` of a page fault.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// Page-fault flag: the access was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

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
const UFFDIO_WRITEPROTECT: libc::c_ulong = uffd_ioc(IOC_RW, 0x06, 24);
const UFFDIO_CONTINUE: libc::c_ulong = uffd_ioc(IOC_RW, 0x07, 32);

/// `UFFDIO_WRITEPROTECT` mode bit: protect (clear it to un-protect and wake).
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

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

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);

/// A page-fault message (`struct uffd_msg`, 32 bytes): event byte, then for
/// a page fault the flags at offset 8, the address at 16 and the faulting
/// thread's id at 24 (with [`FEATURE_THREAD_ID`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    _reserved: [u8; 7],
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// Faulting address.
    pub address: u64,
    /// Faulting thread id (0 without [`FEATURE_THREAD_ID`]).
    pub ptid: u32,
    _pad: u32,
}

const _: () = assert!(std::mem::size_of::<Msg>() == 32);

fn ioctl<T>(fd: i32, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request number together with the
    // repr(C) structure of the kernel ABI that request reads and writes;
    // `arg` is valid and exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd, request, arg as *mut T) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_raw() -> io::Result<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes only flags and returns a new fd
    // or -1; no memory is passed. Never UFFD_USER_MODE_ONLY: KVM faults on
    // guest memory in kernel mode, through get_user_pages.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if raw < 0 {
        return Err(explain_open_error(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// `userfaultfd()` fails with `EPERM` for an unprivileged user when the
/// descriptor would handle kernel-mode faults (KVM's, through
/// get_user_pages): the kernel then wants `vm.unprivileged_userfaultfd = 1`
/// or `CAP_SYS_PTRACE` (`Documentation/admin-guide/mm/userfaultfd.rst`).
/// That error names the fix; others pass unchanged.
fn explain_open_error(e: io::Error) -> io::Error {
    if e.raw_os_error() != Some(libc::EPERM) {
        return e;
    }
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{e}: this user may not handle kernel-mode faults (KVM's); allow it with \
             `sysctl vm.unprivileged_userfaultfd=1` or run with CAP_SYS_PTRACE"
        ),
    )
}

/// The features this kernel's userfaultfd offers: the `UFFDIO_API`
/// handshake with no feature asked on a throw-away descriptor returns them
/// all (a descriptor takes one handshake only).
pub fn supported_features() -> io::Result<u64> {
    let fd = open_raw()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
    Ok(api.features)
}

/// Opens a non-blocking userfaultfd and completes the handshake asking for
/// `features`.
pub fn open(features: u64) -> io::Result<OwnedFd> {
    let fd = open_raw()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
    Ok(fd)
}

/// Registers `[start, start + len)` (mapped by the caller) in `mode`.
pub fn register(fd: i32, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut reg)
}

/// Wakes the threads waiting on faults in the range.
pub fn wake(fd: i32, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl(fd, UFFDIO_WAKE, &mut r)
}

/// Copies `len` bytes from `src` into the missing pages at `dst` and wakes.
///
/// The kernel reads `src` with copy_from_user: a bad pointer is an `EFAULT`,
/// never undefined behaviour in this process.
pub fn copy(fd: i32, dst: u64, src: u64, len: u64) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src,
        len,
        ..Default::default()
    };
    ioctl(fd, UFFDIO_COPY, &mut c)
}

/// Maps the zero page at the missing pages of the range and wakes.
pub fn zeropage(fd: i32, start: u64, len: u64) -> io::Result<()> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        ..Default::default()
    };
    ioctl(fd, UFFDIO_ZEROPAGE, &mut z)
}

/// Maps the page-cache pages of the range (MINOR faults) and wakes.
pub fn continue_(fd: i32, start: u64, len: u64) -> io::Result<()> {
    let mut c = UffdioContinue {
        range: UffdioRange { start, len },
        ..Default::default()
    };
    ioctl(fd, UFFDIO_CONTINUE, &mut c)
}

/// Write-protects the range (`protect`), or un-protects it and wakes.
pub fn writeprotect(fd: i32, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut w)
}

/// Reads one message from the non-blocking `fd`: `None` when none is
/// pending (another reader took it) or the read was interrupted.
pub fn read_msg(fd: i32) -> io::Result<Option<Msg>> {
    let mut msg = std::mem::MaybeUninit::<Msg>::uninit();
    // SAFETY: reads at most one 32-byte message into `msg`, which has room
    // for it; the fd is non-blocking.
    let got = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
    if got < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    if got != 32 {
        return Ok(None);
    }
    // SAFETY: the kernel wrote a whole `struct uffd_msg` (32 bytes), and
    // every bit pattern is a valid `Msg`.
    Ok(Some(unsafe { msg.assume_init() }))
}

/// Waits until `uffd` has a message (`true`) or `stop` is readable
/// (`false`); retries on EINTR.
pub fn wait(uffd: i32, stop: i32) -> io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
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
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// `MADV_DONTNEED` over `[start, start + len)`: drops the page-table
/// entries (and, for private memory, the pages) but keeps a shared file's
/// page cache, so the next access of a MINOR-registered range faults again.
pub fn dontneed(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: advice on a range the caller maps; it drops mappings the
    // caller is about to re-fault, and touches no Rust-visible memory.
    if unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    } == 0
    {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_eperm_from_userfaultfd_names_the_sysctl() {
        let e = explain_open_error(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let m = e.to_string();
        assert!(m.contains("vm.unprivileged_userfaultfd=1"), "{m}");
        assert!(m.contains("Operation not permitted"), "{m}");
        let other = explain_open_error(io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(other.raw_os_error(), Some(libc::EINVAL));
    }
}
