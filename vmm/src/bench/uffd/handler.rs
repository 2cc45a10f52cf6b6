//! The tool's fault handler: `threads` threads per armed uffd (as
//! demand_paging_test's reader threads), each polling its uffd and a stop
//! eventfd, resolving each fault with the mode's ioctl after an optional
//! injected delay, and logging what it did ([`Outcome`]).
//!
//! Per page, a "done" bit (an atomic bitmap over the range) tells a handler
//! that a second fault on a page it already resolved needs only a wake-up;
//! a race the bitmap cannot see (two handlers resolving the same page at
//! once) shows as `EEXIST` from the ioctl and is answered with a wake-up too.
//! `EAGAIN` (the mapping was changing) is retried.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::log::{Event, FaultLog, Outcome};
use super::{sys, Armed, UffdError};
use crate::mm::addr::PAGE_SIZE;

/// Most `EAGAIN` retries of one fault before the handler gives up.
const MAX_EAGAIN: u32 = 10_000;

/// How the handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerConfig {
    /// Threads per uffd (at least 1).
    pub threads: usize,
    /// Delay injected before resolving each fault (demand_paging_test `-d`).
    pub delay: Duration,
    /// Per uffd: pin its handler threads to this CPU (missing: unpinned).
    pub cpus: Vec<Option<usize>>,
}

/// Counts per pass: fault messages and their outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UffdCounts {
    /// Fault messages read.
    pub faults: u64,
    /// Of which reported a write access.
    pub writes: u64,
    /// Resolved by the handler's ioctl.
    pub resolved: u64,
    /// The ioctl found the page resolved already (`EEXIST`), woken.
    pub eexist: u64,
    /// Resolved after one or more `EAGAIN` retries.
    pub eagain_retry: u64,
    /// Known resolved already: `UFFDIO_WAKE` only.
    pub wake_only: u64,
}

impl UffdCounts {
    /// The counts of `events`.
    pub fn of(events: &[Event]) -> Self {
        let mut c = Self::default();
        for e in events {
            c.add(e.outcome, e.write);
        }
        c
    }

    fn add(&mut self, outcome: Outcome, write: bool) {
        self.faults += 1;
        self.writes += u64::from(write);
        *match outcome {
            Outcome::Resolved => &mut self.resolved,
            Outcome::Eexist => &mut self.eexist,
            Outcome::EagainRetry => &mut self.eagain_retry,
            Outcome::WakeOnly => &mut self.wake_only,
        } += 1;
    }

    /// Adds another pass's or round's counts.
    pub fn merge(&mut self, o: &UffdCounts) {
        self.faults += o.faults;
        self.writes += o.writes;
        self.resolved += o.resolved;
        self.eexist += o.eexist;
        self.eagain_retry += o.eagain_retry;
        self.wake_only += o.wake_only;
    }
}

#[derive(Debug)]
struct State {
    armed: Arc<Armed>,
    log: FaultLog,
    /// One bit per page of the range: resolved since the last take.
    done: Vec<AtomicU64>,
    delay: Duration,
}

impl State {
    fn bit(&self, page: u64) -> (usize, u64) {
        let n = (page - self.armed.base) / PAGE_SIZE;
        ((n / 64) as usize, 1 << (n % 64))
    }
}

/// The handler threads; they stop and are joined on drop.
#[derive(Debug)]
pub struct Handler {
    stop: EventFd,
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

impl Handler {
    /// Starts `cfg.threads` threads for each uffd of `armed`.
    pub fn spawn(armed: Arc<Armed>, cfg: &HandlerConfig) -> Result<Self, UffdError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(UffdError::sys("eventfd"))?;
        let pages = armed.len.div_ceil(PAGE_SIZE);
        let state = Arc::new(State {
            done: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            armed,
            log: FaultLog::default(),
            delay: cfg.delay,
        });
        let mut handler = Self {
            stop,
            state,
            threads: Vec::new(),
        };
        for k in 0..handler.state.armed.uffds.len() {
            for t in 0..cfg.threads.max(1) {
                let stop = handler
                    .stop
                    .try_clone()
                    .map_err(UffdError::sys("eventfd dup"))?;
                let st = handler.state.clone();
                let cpu = cfg.cpus.get(k).copied().flatten();
                let thread = std::thread::Builder::new()
                    .name(format!("uffd{k}-handler{t}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            crate::bench::host::pin_current_thread(cpu);
                        }
                        if let Err(e) = serve(&st, k, &stop) {
                            st.log.fail(e.to_string());
                        }
                    })
                    .map_err(UffdError::sys("spawning a handler thread"))?;
                handler.threads.push(thread);
            }
        }
        Ok(handler)
    }

    /// The events since the last call (every fault of a finished pass is
    /// in them), or a handler's error; forgets which pages were resolved,
    /// for the next pass. Call only while no vCPU runs.
    pub fn take(&self) -> Result<Vec<Event>, String> {
        let events = self.state.log.take()?;
        for w in &self.state.done {
            w.store(0, Ordering::Relaxed);
        }
        Ok(events)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(st: &State, k: usize, stop: &EventFd) -> Result<(), UffdError> {
    let fd = st.armed.uffds[k].fd.as_raw_fd();
    while sys::wait(fd, stop.as_raw_fd()).map_err(UffdError::sys("poll"))? {
        // The token first: a fault cannot complete before it is out.
        let token = st.log.begin();
        let Some(msg) = sys::read_msg(fd).map_err(UffdError::sys("read"))? else {
            continue;
        };
        if msg.event != sys::EVENT_PAGEFAULT {
            continue;
        }
        let outcome = handle(st, k, msg.address)?;
        token.record(Event {
            page: msg.address & !(PAGE_SIZE - 1),
            uffd: k,
            tid: msg.ptid,
            write: msg.flags & sys::PAGEFAULT_FLAG_WRITE != 0,
            outcome,
        });
    }
    Ok(())
}

/// Resolves the fault at `addr` on uffd `k`.
fn handle(st: &State, k: usize, addr: u64) -> Result<Outcome, UffdError> {
    let u = &st.armed.uffds[k];
    let fd = u.fd.as_raw_fd();
    let page = addr & !(PAGE_SIZE - 1);
    if !u.contains(page) {
        return Err(UffdError::OutOfRange {
            addr,
            start: u.start,
            len: u.len,
        });
    }
    let (word, mask) = st.bit(page);
    // A page this pass already resolved is still resolved again, not only
    // woken: something may have taken it away since (MADV_COLLAPSE of a
    // memfd unmaps its small pages; a MINOR fault then needs CONTINUE
    // again), and only the ioctl knows. EEXIST then means it was there.
    let known = st.done[word].load(Ordering::Acquire) & mask != 0;
    if !known && !st.delay.is_zero() {
        std::thread::sleep(st.delay);
    }
    let mut outcome = Outcome::Resolved;
    let mut retries = 0;
    loop {
        match st.armed.resolve(fd, page) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                sys::wake(fd, page, PAGE_SIZE).map_err(UffdError::sys("UFFDIO_WAKE"))?;
                outcome = if known {
                    Outcome::WakeOnly
                } else {
                    Outcome::Eexist
                };
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && retries < MAX_EAGAIN => {
                retries += 1;
                outcome = Outcome::EagainRetry;
            }
            Err(e) => return Err(UffdError::sys("resolving a fault")(e)),
        }
    }
    st.done[word].fetch_or(mask, Ordering::Release);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::uffd::Mode;
    use crate::mm::backing::HostMapping;

    fn spawn(mode: Mode, pages: u64, parts: &[(u64, u64)]) -> (HostMapping, Arc<Armed>, Handler) {
        let m = HostMapping::new(&mode.host_kind(), pages * PAGE_SIZE).unwrap();
        let armed = Arc::new(Armed::new(mode, &m, parts, 7, true).unwrap());
        let h = Handler::spawn(
            armed.clone(),
            &HandlerConfig {
                threads: 2,
                delay: Duration::ZERO,
                cpus: Vec::new(),
            },
        )
        .unwrap();
        (m, armed, h)
    }

    fn read(m: &HostMapping, page: u64) -> u8 {
        // SAFETY: inside the mapping; the handler resolves the fault.
        unsafe { std::ptr::read_volatile(m.as_ptr().add((page * PAGE_SIZE) as usize)) }
    }

    fn pages(m: &HostMapping, events: &[Event]) -> Vec<u64> {
        let mut p: Vec<u64> = events
            .iter()
            .map(|e| (e.page - m.hva().0) / PAGE_SIZE)
            .collect();
        p.sort_unstable();
        p
    }

    #[test]
    fn test_uffd_zero_resolves_exactly_the_touched_pages() {
        let (m, _a, h) = spawn(Mode::Zero, 16, &[(0, 16 * PAGE_SIZE)]);
        for page in [1u64, 5, 9] {
            assert_eq!(read(&m, page), 0);
        }
        let events = h.take().unwrap();
        assert_eq!(pages(&m, &events), vec![1, 5, 9]);
        let c = UffdCounts::of(&events);
        assert_eq!((c.faults, c.resolved, c.writes), (3, 3, 0));
        // This thread faulted: the messages carry its id.
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        assert!(events.iter().all(|e| e.tid == tid), "{events:?}");
    }

    #[test]
    fn test_uffd_copy_and_minor_map_the_fill_pattern() {
        for mode in [Mode::Copy, Mode::Minor] {
            let (m, _a, h) = spawn(mode, 4, &[(0, 4 * PAGE_SIZE)]);
            let at = 2 * PAGE_SIZE + 16;
            // SAFETY: inside the 4-page mapping.
            let v = unsafe { std::ptr::read_volatile(m.as_ptr().add(at as usize).cast::<u64>()) };
            let want = guest_image::protocol::pattern_word(7, crate::bench::TEST_BASE + at);
            assert_eq!(v, want, "{mode}");
            let events = h.take().unwrap();
            assert_eq!(pages(&m, &events), vec![2], "{mode}");
            assert_eq!(events[0].outcome, Outcome::Resolved);
        }
    }

    /// A MINOR page resolved earlier in the pass whose mapping went away
    /// (its page cache kept, as `MADV_COLLAPSE` of a memfd leaves it) is
    /// resolved again. A handler that took its bitmap's word for it and only
    /// woke the fault left the access faulting forever (this test hung).
    #[test]
    fn test_uffd_minor_page_unmapped_after_resolving_is_resolved_again() {
        let (m, _a, h) = spawn(Mode::Minor, 4, &[(0, 4 * PAGE_SIZE)]);
        read(&m, 1);
        // The log only: `take` would also forget which pages were resolved.
        let first = h.state.log.take().unwrap();
        assert_eq!(pages(&m, &first), vec![1]);
        // SAFETY: drops the PTE of page 1 of our own shared memfd mapping;
        // its page cache (the FILL pattern) stays.
        let r = unsafe {
            libc::madvise(
                m.as_ptr().add(PAGE_SIZE as usize).cast(),
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        let at = PAGE_SIZE + 8;
        let (tx, rx) = std::sync::mpsc::channel();
        let p = m.as_ptr() as usize;
        std::thread::spawn(move || {
            // SAFETY: inside the 4-page mapping, which stays mapped while
            // this thread may read it: the test leaks it if the read hangs.
            let v = unsafe { std::ptr::read_volatile((p + at as usize) as *const u64) };
            let _ = tx.send(v);
        });
        let Ok(v) = rx.recv_timeout(std::time::Duration::from_secs(10)) else {
            std::mem::forget(m);
            panic!("the second MINOR fault on page 1 was never resolved");
        };
        let want = guest_image::protocol::pattern_word(7, crate::bench::TEST_BASE + at);
        assert_eq!(v, want);
        let again = h.take().unwrap();
        assert_eq!(pages(&m, &again), vec![1]);
        assert_eq!(again[0].outcome, Outcome::Resolved);
    }

    #[test]
    fn test_uffd_wp_faults_on_writes_only() {
        let (m, _a, h) = spawn(Mode::Wp, 8, &[(0, 8 * PAGE_SIZE)]);
        for page in 0..8 {
            assert_eq!(read(&m, page), 0);
        }
        assert_eq!(h.take().unwrap(), vec![], "reads of protected pages");
        // SAFETY: inside the mapping; the handler un-protects the page.
        unsafe { std::ptr::write_volatile(m.as_ptr().add(3 * PAGE_SIZE as usize), 1) };
        let events = h.take().unwrap();
        assert_eq!(pages(&m, &events), vec![3]);
        assert!(events[0].write);
    }

    #[test]
    fn test_uffd_per_part_uffds_see_only_their_part() {
        let half = 4 * PAGE_SIZE;
        let (m, armed, h) = spawn(Mode::Zero, 8, &[(0, half), (half, half)]);
        assert_eq!(armed.uffds.len(), 2);
        read(&m, 1);
        read(&m, 6);
        let events = h.take().unwrap();
        let mut by_uffd: Vec<(usize, u64)> = events
            .iter()
            .map(|e| (e.uffd, (e.page - m.hva().0) / PAGE_SIZE))
            .collect();
        by_uffd.sort_unstable();
        assert_eq!(by_uffd, vec![(0, 1), (1, 6)]);
    }

    #[test]
    fn test_uffd_batched_copy_crosses_per_part_uffds_and_leaves_no_fault() {
        let half = 4 * PAGE_SIZE;
        let (m, armed, h) = spawn(Mode::Copy, 8, &[(0, half), (half, half)]);
        // Pages 2..6: two pages in each part's uffd, in one call.
        assert_eq!(
            armed.copy(2 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap(),
            4 * PAGE_SIZE
        );
        for page in 2..6u64 {
            let at = page * PAGE_SIZE + 8;
            // SAFETY: inside the 8-page mapping, copied above.
            let v = unsafe { std::ptr::read_volatile(m.as_ptr().add(at as usize).cast::<u64>()) };
            let want = guest_image::protocol::pattern_word(7, crate::bench::TEST_BASE + at);
            assert_eq!(v, want, "page {page}");
        }
        assert_eq!(h.take().unwrap(), vec![], "copied pages fault no more");
        read(&m, 7);
        assert_eq!(pages(&m, &h.take().unwrap()), vec![7]);
        // Out of range, unaligned, and a page copied already all fail.
        assert!(armed.copy(6 * PAGE_SIZE, 4 * PAGE_SIZE).is_err());
        assert!(armed.copy(PAGE_SIZE / 2, PAGE_SIZE).is_err());
        assert!(armed.copy(2 * PAGE_SIZE, PAGE_SIZE).is_err());
        // Modes without a copy source refuse.
        let (_z, zero, _hz) = spawn(Mode::Zero, 2, &[(0, 2 * PAGE_SIZE)]);
        assert!(matches!(zero.copy(0, PAGE_SIZE), Err(UffdError::Setup(_))));
    }

    #[test]
    fn test_uffd_second_fault_on_a_resolved_page_is_wake_only() {
        let (m, armed, h) = spawn(Mode::Zero, 2, &[(0, 2 * PAGE_SIZE)]);
        read(&m, 0);
        // The read returns as soon as the ioctl woke it, which can be before
        // the handler thread marks the page resolved: wait for the mark.
        let (word, mask) = h.state.bit(m.hva().0);
        let since = std::time::Instant::now();
        while h.state.done[word].load(Ordering::Acquire) & mask == 0 {
            assert!(since.elapsed() < std::time::Duration::from_secs(10));
            std::thread::yield_now();
        }
        // A second message for page 0 (as a second vCPU racing the first
        // would produce): the handler knows it resolved, and only wakes.
        let outcome = handle(&h.state, 0, m.hva().0 + 8).unwrap();
        assert_eq!(outcome, Outcome::WakeOnly);
        // A page resolved behind the bitmap's back: the ioctl says EEXIST.
        h.take().unwrap();
        let outcome = handle(&h.state, 0, m.hva().0).unwrap();
        assert_eq!(outcome, Outcome::Eexist);
        drop(armed);
    }
}
