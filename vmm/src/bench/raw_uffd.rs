//! The raw baseline's userfaultfd handler: the least a handler can do, so
//! the uffd kinds get a tool/raw ratio like the others. Per uffd, the same
//! number of threads as the tool's handler, each looping on poll, read, the
//! injected delay, the mode's one ioctl, and `UFFDIO_WAKE` after `EEXIST`
//! (as demand_paging_test's handler). No log, no bitmap, no counters, no
//! lock: only the system calls. The range is armed by the same
//! [`Armed::new`] as the tool's (setup is outside every timed window).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::raw_stop::RawStop;
use super::uffd::{sys, Armed, Mode, UffdError};
use crate::mm::addr::PAGE_SIZE;

/// The raw handler threads; they stop and are joined on drop.
#[derive(Debug)]
pub struct RawHandlers {
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
}

impl RawHandlers {
    /// Starts `threads` threads per uffd of `armed`, each sleeping `delay`
    /// before it resolves a fault, uffd `k`'s pinned to `cpus[k]` if given;
    /// a failing thread aborts `on_failure` (its vCPUs would wait for ever).
    pub fn start(
        armed: &Arc<Armed>,
        threads: usize,
        delay: Duration,
        cpus: &[Option<usize>],
        on_failure: Arc<RawStop>,
    ) -> Result<Self, UffdError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(UffdError::sys("eventfd"))?;
        let mut out = Self {
            stop,
            threads: Vec::new(),
            error: Arc::default(),
        };
        for k in 0..armed.uffds.len() {
            for _ in 0..threads.max(1) {
                let stop = out
                    .stop
                    .try_clone()
                    .map_err(UffdError::sys("eventfd dup"))?;
                let (armed, error, raw_stop) =
                    (armed.clone(), out.error.clone(), on_failure.clone());
                let cpu = cpus.get(k).copied().flatten();
                let t = std::thread::Builder::new()
                    .name(format!("raw-uffd{k}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            super::host::pin_current_thread(cpu);
                        }
                        if let Err(e) = serve(&armed, k, delay, stop.as_raw_fd()) {
                            let reason = format!("raw uffd handler: {e}");
                            // Its vCPUs would wait on their faults for ever.
                            raw_stop.abort(reason.clone());
                            *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                        }
                    })
                    .map_err(UffdError::sys("spawning a raw handler thread"))?;
                out.threads.push(t);
            }
        }
        Ok(out)
    }

    /// Stops the threads; a handler's error, if one failed.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop_all();
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop_all(&mut self) {
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RawHandlers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn serve(armed: &Armed, k: usize, delay: Duration, stop: i32) -> std::io::Result<()> {
    let fd = armed.uffds[k].fd.as_raw_fd();
    let (mode, base) = (armed.mode, armed.base);
    let src = armed.source_of(base).unwrap_or(0);
    while sys::wait(fd, stop)? {
        let Some(msg) = sys::read_msg(fd)? else {
            continue;
        };
        if msg.event != sys::EVENT_PAGEFAULT {
            continue;
        }
        let page = msg.address & !(PAGE_SIZE - 1);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        loop {
            let r = match mode {
                Mode::Zero => sys::zeropage(fd, page, PAGE_SIZE),
                Mode::Copy => sys::copy(fd, page, src + (page - base), PAGE_SIZE),
                Mode::Minor => sys::continue_(fd, page, PAGE_SIZE),
                Mode::Wp => sys::writeprotect(fd, page, PAGE_SIZE, false),
            };
            match r {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    sys::wake(fd, page, PAGE_SIZE)?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
