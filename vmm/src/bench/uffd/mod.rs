//! userfaultfd demand paging for the test range, handled in-process.
//!
//! - `sys`: the kernel ABI (ioctl numbers and structures from
//!   `include/uapi/linux/userfaultfd.h`) as plain functions;
//! - `arm`: the four modes ([`Mode`]: zero, copy, minor, wp), the memory each
//!   needs, registration with one uffd or one per vCPU part, re-arming;
//! - `log`: the fault log the handler threads fill without a lock across
//!   their ioctls, and each message's [`Outcome`];
//! - `handler`: N threads per uffd that resolve faults and log them.
//!
//! Descriptors are opened with `O_NONBLOCK | O_CLOEXEC`, never
//! `UFFD_USER_MODE_ONLY`: KVM faults on guest memory in kernel mode, through
//! get_user_pages, and those faults must reach the handler.

mod arm;
mod handler;
mod log;
pub(crate) mod sys;

use std::io;

pub use arm::{Armed, Mode};
pub use handler::{Handler, HandlerConfig, UffdCounts};
pub use log::{Event, Outcome};

/// Errors of userfaultfd setup and handling.
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
    /// The kernel's userfaultfd lacks a feature the mode needs.
    #[error(
        "uffd-{mode} needs {feature}, which this kernel's userfaultfd does not offer (UFFDIO_API)"
    )]
    Unsupported {
        /// The mode asked for.
        mode: Mode,
        /// The missing feature.
        feature: &'static str,
    },
    /// Memory for the mode could not be set up.
    #[error("userfaultfd: {0}")]
    Backing(#[from] crate::mm::backing::BackingError),
    /// A precondition of the mode does not hold.
    #[error("userfaultfd: {0}")]
    Setup(&'static str),
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

impl UffdError {
    /// A mapper from an OS error of `what`.
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(io::Error) -> UffdError {
        move |source| UffdError::Sys { what, source }
    }
}
