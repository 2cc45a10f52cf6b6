//! Stopping a vCPU that runs on the calling thread (see [`super::on_caller`])
//! when its run times out or the process gets SIGINT or SIGTERM: there is
//! no event loop to notice, only signals can reach a thread inside
//! `KVM_RUN`.
//!
//! The protocol is KVM's `immediate_exit` (Documentation/virt/kvm/api.rst,
//! `struct kvm_run`): a stop request sets the vCPU loop's stop flag, then
//! `kvm_run.immediate_exit`, then kicks the vCPU thread with
//! [`vcpu::kick_signal`]. The loop checks the flag before every `KVM_RUN`.
//! - A request that lands while the guest runs interrupts `KVM_RUN`
//!   (EINTR); the loop then sees the flag.
//! - A request that lands between the loop's check and the ioctl ran its
//!   handler in user space: no signal is left pending for `KVM_RUN` to see,
//!   and a spinning guest would run on forever. `immediate_exit` makes that
//!   `KVM_RUN` return EINTR at once (KVM reads it on entry).
//!
//! The timeout is a POSIX timer aimed at the vCPU thread (`SIGEV_THREAD_ID`)
//! with its own real-time signal, whose action makes the request there once
//! the run's deadline has passed;
//! SIGINT and SIGTERM may land on any thread of the process, whose action
//! makes the request and kicks the vCPU thread. Actions go through
//! `signal-hook`'s registry, so they chain with other runs' in the same
//! process; each only writes atomics and a byte of the `kvm_run` page and
//! calls `tgkill`, all async-signal-safe. The model of the protocol is in
//! `stop_loom_tests.rs`.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use signal_hook::low_level::{register, unregister};
use signal_hook::SigId;

use super::events::StopCause;
use crate::vcpu;

/// Why a stop was requested: bits of [`Target::why`].
const WHY_TIMEOUT: u8 = 1;
const WHY_SIGINT: u8 = 2;
const WHY_SIGTERM: u8 = 4;

/// The real-time signal of the timeout timer: the one after the vCPU kick.
fn timeout_signal() -> libc::c_int {
    vcpu::kick_signal() + 1
}

/// A second shared mapping of a vCPU's `kvm_run` page (offset 0 of the vCPU
/// fd), owned here, so a signal action can set `immediate_exit` whatever the
/// vCPU loop has done with its fd: the page stays mapped until this drops.
struct RunPage {
    page: NonNull<kvm_run>,
    len: usize,
}

// SAFETY: the page is only written with volatile byte stores (which KVM
// reads with READ_ONCE); any thread may do that while it is mapped.
unsafe impl Send for RunPage {}
// SAFETY: as for Send: no reference into the page is ever handed out.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn map(fd: &VcpuFd) -> io::Result<Self> {
        let len = std::mem::size_of::<kvm_run>();
        // SAFETY: a new shared mapping of the vCPU fd's first page, which KVM
        // lets userspace map (its `kvm_run`); it aliases no Rust memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page =
            NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { page, len })
    }

    /// Sets `immediate_exit`: the next `KVM_RUN` returns EINTR at once.
    fn set_immediate_exit(&self) {
        // SAFETY: the page is mapped read-write until `self` drops, and
        // `immediate_exit` is a byte inside it; no reference to it exists.
        unsafe { std::ptr::addr_of_mut!((*self.page.as_ptr()).immediate_exit).write_volatile(1) }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it
        // any more (the last `Target` holding it is going away).
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.len) };
    }
}

/// What a stop request acts on; shared by the signal actions.
struct Target {
    /// The vCPU loop's stop flag.
    stop: Arc<AtomicBool>,
    run_page: RunPage,
    pid: libc::pid_t,
    /// The vCPU thread.
    tid: libc::pid_t,
    /// When the timeout is due; `None`: beyond what `Instant` can count,
    /// never.
    deadline: Option<Instant>,
    /// `WHY_*` bits of the requests made.
    why: AtomicU8,
}

impl Target {
    /// Requests the stop: flag, `immediate_exit`, kick. Async-signal-safe.
    fn request(&self, why: u8) {
        self.why.fetch_or(why, Ordering::Relaxed);
        self.stop.store(true, Ordering::Release);
        // A plain store after the flag's: x86 keeps stores in order, and
        // KVM_RUN reads it on entry (a syscall, a full barrier).
        self.run_page.set_immediate_exit();
        // SAFETY: tgkill(2) of the vCPU thread, which lives at least as long
        // as the actions that call this (it disarms them); the kick signal
        // has a no-op handler (`vcpu::install_kick_handler`).
        unsafe { libc::syscall(libc::SYS_tgkill, self.pid, self.tid, vcpu::kick_signal()) };
    }
}

/// The timeout timer and the signal actions of a vCPU running on the
/// calling thread. Dropping it (or [`disarm`](Self::disarm)) deletes the
/// timer and unregisters the actions.
pub(super) struct StopSignals {
    target: Arc<Target>,
    actions: Vec<SigId>,
    timer: Option<libc::timer_t>,
}

impl std::fmt::Debug for StopSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignals")
            .field("tid", &self.target.tid)
            .finish_non_exhaustive()
    }
}

impl StopSignals {
    /// Arms them for `fd`, which the calling thread is about to run: its
    /// loop stops once `stop` is set; the timer fires after `timeout`.
    pub(super) fn arm(fd: &VcpuFd, stop: Arc<AtomicBool>, timeout: Duration) -> io::Result<Self> {
        vcpu::install_kick_handler().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let target = Arc::new(Target {
            stop,
            run_page: RunPage::map(fd)?,
            // SAFETY: getpid(2) and gettid(2) cannot fail.
            pid: unsafe { libc::getpid() },
            // SAFETY: as above.
            tid: unsafe { libc::gettid() },
            deadline: Instant::now().checked_add(timeout),
            why: AtomicU8::new(0),
        });
        let mut armed = Self {
            target,
            actions: Vec::new(),
            timer: None,
        };
        // On an error below, dropping `armed` undoes what was done.
        for (signal, why) in [(libc::SIGINT, WHY_SIGINT), (libc::SIGTERM, WHY_SIGTERM)] {
            let target = armed.target.clone();
            // SAFETY: the action is async-signal-safe (`Target::request`).
            let id = unsafe { register(signal, move || target.request(why)) }?;
            armed.actions.push(id);
        }
        // Other runs' timers in the same process raise the same signal: the
        // action acts only once this run's deadline has passed (the timer
        // and `Instant` both count CLOCK_MONOTONIC).
        let target = armed.target.clone();
        let on_timer = move || {
            if target.deadline.is_some_and(|d| Instant::now() >= d) {
                target.request(WHY_TIMEOUT);
            }
        };
        // SAFETY: the action is async-signal-safe (clock_gettime, `request`).
        let id = unsafe { register(timeout_signal(), on_timer) }?;
        armed.actions.push(id);
        if let Some(deadline) = armed.target.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            armed.timer = Some(start_timer(armed.target.tid, left)?);
        }
        Ok(armed)
    }

    /// Disarms; returns why a stop was requested, if one was: a signal
    /// before the timeout, the lower-numbered signal of two (the order the
    /// kernel delivers pending signals in).
    pub(super) fn disarm(mut self) -> Option<StopCause> {
        self.release();
        let why = self.target.why.load(Ordering::Acquire);
        if why & WHY_SIGINT != 0 {
            Some(StopCause::Signal("SIGINT"))
        } else if why & WHY_SIGTERM != 0 {
            Some(StopCause::Signal("SIGTERM"))
        } else if why & WHY_TIMEOUT != 0 {
            Some(StopCause::Timeout)
        } else {
            None
        }
    }

    /// Deletes the timer (and any signal of it still queued), then removes
    /// the actions; once `unregister` returns, none of them runs.
    fn release(&mut self) {
        if let Some(timer) = self.timer.take() {
            // SAFETY: a timer `start_timer` created and nothing deleted yet.
            unsafe { libc::timer_delete(timer) };
        }
        for id in self.actions.drain(..) {
            unregister(id);
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        self.release();
    }
}

/// A one-shot CLOCK_MONOTONIC timer that sends [`timeout_signal`] to thread
/// `tid` after `timeout`.
fn start_timer(tid: libc::pid_t, timeout: Duration) -> io::Result<libc::timer_t> {
    // SAFETY: all-zero is a valid sigevent (integers and a pointer union).
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_THREAD_ID;
    event.sigev_signo = timeout_signal();
    event.sigev_notify_thread_id = tid;
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: both pointers are to initialized locals.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // A zero it_value would disarm the timer: a zero timeout fires at once.
    let timeout = timeout.max(Duration::from_nanos(1));
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `timer` was just created; `spec` is initialized; no old value.
    if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: the timer created above, deleted once.
        unsafe { libc::timer_delete(timer) };
        return Err(e);
    }
    Ok(timer)
}
