//! A device thread holding a guard across a memory op (the sim tier's
//! `--guard-reader`): before each op the runner has it take a guard on a
//! page of the op's range, write a pattern there and hold the guard a
//! moment; the op must wait for it (the drain: no slot is deleted and no
//! host memory discarded while a guard holds it), so the pattern is still
//! there when the reader looks again before letting go. The kernel's
//! counterpart is `mmu_notifier`'s rule that a secondary MMU's access in a
//! read-side section finishes before `invalidate_range_start` returns.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mm::addr::Gpa;
use crate::mm::manager::MemoryManager;

/// How long the reader holds its guard: long against an op on SimKvm (a
/// few microseconds), short against the drain bound.
const HOLD: Duration = Duration::from_millis(1);

/// What the reader did with a request.
#[derive(Debug)]
enum Event {
    /// It holds a guard on the page and wrote (or read) its word.
    Holding,
    /// The page could not be guarded (unplugged or busy): no check.
    Missed,
    /// The guard is dropped; the word was as left, or what changed.
    Done(Result<(), String>),
}

/// The reader thread and its channels.
#[derive(Debug)]
pub struct GuardReader {
    requests: Option<Sender<Gpa>>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

/// A request in flight: [`GuardReader::hold`] returned it, the op runs,
/// then [`Held::finish`] waits for the verdict.
#[derive(Debug)]
#[must_use = "finish the hold to learn whether the guard's page changed under it"]
pub struct Held<'a> {
    reader: &'a GuardReader,
    holding: bool,
}

impl GuardReader {
    /// Starts the thread on `memory`.
    pub fn start(memory: Arc<MemoryManager>) -> Self {
        let (requests, inbox) = channel::<Gpa>();
        let (outbox, events) = channel();
        let thread = std::thread::spawn(move || {
            let mut n: u64 = 0;
            for gpa in inbox {
                n += 1;
                let Ok(guard) = memory.try_acquire(gpa) else {
                    let _ = outbox.send(Event::Missed);
                    continue;
                };
                // A read-only slot cannot be written through a guard: its
                // word is only read, and must read the same.
                let pattern = 0x5a5a_0000_0000_0000 | n;
                let want = match guard.write_u64(gpa, pattern) {
                    Ok(()) => Ok(pattern),
                    Err(_) => guard.read_u64(gpa),
                };
                let Ok(want) = want else {
                    let _ = outbox.send(Event::Missed);
                    continue;
                };
                let _ = outbox.send(Event::Holding);
                std::thread::sleep(HOLD);
                let verdict = match guard.read_u64(gpa) {
                    Ok(v) if v == want => Ok(()),
                    Ok(v) => Err(format!(
                        "the word at {gpa:#x} changed from {want:#x} to {v:#x} while a guard held its slot"
                    )),
                    Err(e) => Err(format!("reading {gpa:#x} through a held guard: {e}")),
                };
                drop(guard);
                let _ = outbox.send(Event::Done(verdict));
            }
        });
        Self {
            requests: Some(requests),
            events,
            thread: Some(thread),
        }
    }

    /// Has the reader guard the page holding `gpa` and returns once it holds
    /// it (or could not take it).
    pub fn hold(&self, gpa: Gpa) -> Held<'_> {
        let page = Gpa(gpa.0 & !0xfff);
        let sent = self.requests.as_ref().is_some_and(|r| r.send(page).is_ok());
        let holding = sent && matches!(self.events.recv(), Ok(Event::Holding));
        Held {
            reader: self,
            holding,
        }
    }
}

impl Held<'_> {
    /// Waits for the reader to let go: `Err` says what changed under its
    /// guard.
    pub fn finish(self) -> Result<(), String> {
        if !self.holding {
            return Ok(());
        }
        match self.reader.events.recv() {
            Ok(Event::Done(verdict)) => verdict,
            Ok(e) => Err(format!("guard reader out of step: {e:?}")),
            Err(_) => Err("the guard reader thread died".into()),
        }
    }
}

impl Drop for GuardReader {
    fn drop(&mut self) {
        self.requests = None; // ends the thread's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
